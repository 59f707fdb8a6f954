"""Predict a far checkpoint at every save of a Hugging Face / TRL trainer.

    python examples/trainer_callback.py [OUT_DIR]

:class:`RelexCallback` is a ``transformers.TrainerCallback``: give it to any ``Trainer``
(TRL's ``GRPOTrainer``, ``PPOTrainer``… are Trainers) with the directory of the model the
run started from. At each save it keeps the paths of the last ``history`` checkpoints
(``OUTPUT_DIR/checkpoint-N``) and writes the RELEX prediction of step
``horizon x N`` beside them (``OUTPUT_DIR/relex/step_<S>``, a ready-to-load model directory),
streaming the checkpoints from disk in bounded memory. Keep ``save_total_limit`` unset or
>= ``history``: the trainer deletes older checkpoints itself.

The demo trains a tiny Qwen2 model for a few steps on CPU (random tokens, a stand-in for an
RL run) and predicts at each save.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainerCallback, TrainingArguments

import relex_kernels as rk


class RelexCallback(TrainerCallback):
    def __init__(self, base_dir: str, history: int = 4, horizon: float = 4.0, out_dir: str | None = None):
        if history < 2:
            raise ValueError("RELEX needs at least 2 history checkpoints")
        self.base_dir, self.history, self.horizon, self.out_dir = base_dir, history, horizon, out_dir
        self.saved: list[tuple[int, str]] = []
        self.predictions: list[str] = []

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        step = state.global_step
        self.saved = [(s, d) for s, d in self.saved if os.path.isdir(d)][-(self.history - 1):]
        self.saved.append((step, os.path.join(args.output_dir, f"checkpoint-{step}")))
        if len(self.saved) < self.history:
            return
        target = int(round(step * self.horizon))
        out = self.out_dir or os.path.join(args.output_dir, "relex")
        res = rk.extrapolate(self.base_dir, dict(self.saved), [target], out, overwrite=True)
        self.predictions += res.outputs
        print(f"relex: step {target} predicted from steps {[s for s, _ in self.saved]} -> {res.outputs[0]}")


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(workdir: str | None = None, steps: int = 6) -> list[str]:
    work = workdir or tempfile.mkdtemp(prefix="relex-trainer-")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    base_dir = os.path.join(work, "base")
    model.save_pretrained(base_dir)  # the model the run starts from
    args = TrainingArguments(output_dir=os.path.join(work, "run"), max_steps=steps, save_steps=1,
                             per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], use_cpu=True,
                             logging_steps=steps, disable_tqdm=True, save_only_model=True)
    cb = RelexCallback(base_dir, history=4, horizon=4.0)
    Trainer(model=model, args=args, train_dataset=RandomTokens(64, 16, cfg.vocab_size), callbacks=[cb]).train()
    return cb.predictions


if __name__ == "__main__":
    preds = main(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"{len(preds)} predictions written")
