# evotune demo: a tiny Llama (2 layers, hidden 64, 4 heads / 2 KV heads, random init)
# trained on Python standard-library docstrings packed InternEvo-style.
# Built by scripts/build_demo_assets.py (demo/val: docstrings held out from training);
# runs in about a minute on 2 CPU cores.
import os

from evotune.data import InternRepoSampler, build_packed_dataset, load_intern_repo_tokenized_dataset

_demo = os.path.join(os.path.dirname(__file__), os.pardir, "demo")

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = os.path.join(_demo, "model")
use_varlen_attn = True
dtype = "float32"

# Data
dataset_folder = os.path.join(_demo, "data")
max_length = 256
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 2  # packs per micro-batch, flattened into one varlen row
accumulative_counts = 2
max_epochs = 2
lr = 3e-3
betas = (0.9, 0.95)
weight_decay = 0.01
max_norm = 1.0
warmup_ratio = 0.05
lr_schedule = "internevo"
eta_min = 3e-4
loss_reduction = "pack"

# Save
save_steps = 100
save_total_limit = 2
seed = 0

# Validation: held-out docstrings (never trained on), every 50 steps and at the end
val_dataset_folder = os.path.join(_demo, "val")
eval_steps = 50

# Evaluate the generation performance during the training (XTuner's EvaluateChatHook)
evaluation_freq = 100
evaluation_inputs = ["Explain json.dumps:\n", "Explain os.path.join:\n"]
prompt_template = None  # the demo's data is plain prompt + answer text
SYSTEM = ""
max_new_tokens = 48

#######################################################################
#                      PART 2  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=build_packed_dataset,
    dataset_cfg=dict(
        type=load_intern_repo_tokenized_dataset,
        folder=dataset_folder,
        min_length=0,
        data_order_path=None,
        file_type=".bin",
    ),
    packed_length=max_length,
    seed=1024,
)

train_dataloader = dict(
    num_workers=0,
    sampler=dict(type=InternRepoSampler, shuffle=True, seed=1024),
)
