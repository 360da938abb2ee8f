"""Run by tests/test_distributed.py, under torchrun or alone: ``python dp_trainer_worker.py
OUT PER_DEVICE_BATCH``. DPTrainer on a tiny Llama for 3 SGD steps with σ = 1 and a fixed
dp_seed; rank 0 saves the weights and ε to OUT."""
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
import transformers  # noqa: E402

from hf_zoo import make  # noqa: E402
from test_dp_trainer import collate, dataset  # noqa: E402
from vaultkern.hf import DPTrainer  # noqa: E402

if __name__ == "__main__":
    warnings.simplefilter("ignore")
    out, per_device = sys.argv[1], int(sys.argv[2])
    model = make("llama", dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    args = transformers.TrainingArguments(
        output_dir=out + ".dir", per_device_train_batch_size=per_device, max_steps=3,
        learning_rate=0.05, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_steps=1)
    # physical micro-batches of 2 rows: several backward passes per step on each rank
    trainer = DPTrainer(model=model, args=args, train_dataset=dataset(), data_collator=collate,
                        noise_multiplier=1.0, target_delta=1e-3, max_grad_norm=0.5, dp_seed=7,
                        optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)))
    trainer.dp_physical_batch = 2
    trainer.train()
    if trainer.args.process_index == 0:
        torch.save({"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "epsilon": trainer.get_epsilon(), "q": trainer.dp.sample_rate,
                    "world": trainer.args.world_size}, out)
