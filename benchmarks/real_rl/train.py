"""The real run: a short supervised phase, then GRPO with TRL, every step saved as users' trainers save it.

* :func:`sft` teaches the task to a middling accuracy (a plain next-token loss on the answer
  tokens, stopped once a dev set — not the held-out set — is answered at ``target_acc``) and
  writes the RL start, ``base/`` (fp32, what GRPO loads) and ``base_bf16/`` (the same model
  as bf16, what a released model looks like).
* :func:`grpo` runs TRL's ``GRPOTrainer`` from ``base/`` with a verifiable reward (exact answer, partial credit per digit). TRL
  itself writes ``trl/checkpoint-N`` (fp32 safetensors) at every step; a callback writes the
  bf16 export of the same step, ``bf16/checkpoint-N``, as ``save_pretrained`` of a bf16 copy.
* :func:`write_verl_masters` writes the fp32 master weights of chosen steps as verl's FSDP
  actor saves them: ranks of a CPU ``gloo`` group shard the real Qwen3 module with FSDP2
  (verl's placement rule) and ``torch.save(model.state_dict())`` their shards to
  ``verl/global_step_N/actor/model_world_size_W_rank_R.pt``.
"""

from __future__ import annotations

import json
import os
import time

import torch

import task


def _sft_batch(tok, pairs):
    ids, labels = [], []
    for a, b in pairs:
        p = tok(task.prompt(a, b), add_special_tokens=False)["input_ids"]
        ans = tok(task.answer(a, b), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(p + ans)
        labels.append([-100] * len(p) + ans)
    L = max(map(len, ids))
    x = torch.full((len(ids), L), tok.pad_token_id)
    y = torch.full((len(ids), L), -100)
    m = torch.zeros((len(ids), L), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(ids, labels)):  # left padding, as generation sees prompts
        x[i, L - len(s):] = torch.tensor(s)
        y[i, L - len(s):] = torch.tensor(lab)
        m[i, L - len(s):] = 1
    return x, y, m


def sft(out: str, *, size: str, seed: int, held: list, max_steps: int, target_acc: float, lr: float = 1e-3,
        batch: int = 128, check_every: int = 50, log=print) -> dict:
    """Train until the dev accuracy reaches ``target_acc`` (checked every ``check_every`` steps)."""
    tok = task.make_tokenizer()
    model = task.make_model(tok, size, seed)
    dev = task.problems(500, seed + 11, exclude=set(held))
    train = task.problems(max_steps * batch, seed + 12, exclude=set(held) | set(dev))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    torch.manual_seed(seed)
    t0, step, acc = time.time(), 0, 0.0
    while step < max_steps:
        model.train()
        step += 1
        x, y, m = _sft_batch(tok, train[(step - 1) * batch: step * batch])
        model(input_ids=x, attention_mask=m, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % check_every == 0 or step == max_steps:
            acc = task.greedy_accuracy(model, tok, dev)
            log(f"  sft step {step}: dev accuracy {acc:.3f} ({time.time() - t0:.0f} s)")
            if acc >= target_acc:
                break
    # The RL start holds bf16 values, as a released model loaded into fp32 masters does: the
    # fp32 base, the bf16 base and step 0 of every saved variant are then the same numbers.
    model = model.to(torch.bfloat16).to(torch.float32).eval()
    acc = task.greedy_accuracy(model, tok, dev)
    model.save_pretrained(os.path.join(out, "base"))
    tok.save_pretrained(os.path.join(out, "base"))
    _save_bf16(model, tok, os.path.join(out, "base_bf16"))
    return {"steps": step, "dev_accuracy": acc, "seconds": time.time() - t0,
            "parameters": sum(p.numel() for p in model.parameters())}


def _save_bf16(model, tok, path: str) -> None:
    import copy
    half = copy.deepcopy(model).to(torch.bfloat16)
    half.save_pretrained(path)
    tok.save_pretrained(path)


def grpo(out: str, *, steps: int, seed: int, held: list, lr: float, prompts_per_step: int, generations: int,
         log=print) -> dict:
    """GRPO from ``out/base`` for ``steps`` steps; returns TRL's per-step log (reward, etc.)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen3ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(os.path.join(out, "base"))
    model = Qwen3ForCausalLM.from_pretrained(os.path.join(out, "base"), dtype=torch.float32)
    pairs = task.problems(steps * prompts_per_step, seed + 21, exclude=set(held))
    data = Dataset.from_dict({"prompt": [task.prompt(a, b) for a, b in pairs],
                              "answer": [task.answer(a, b) for a, b in pairs]})

    def answer_reward(completions, answer, **_):
        return [task.reward(c, t) for c, t in zip(completions, answer)]

    class ExportBf16(TrainerCallback):
        """After TRL saved checkpoint-N: the bf16 export of the same weights, as an HF export."""

        def on_save(self, args, state, control, model=None, **kw):
            _save_bf16(model, tok, os.path.join(out, "bf16", f"checkpoint-{state.global_step}"))

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                log(f"  grpo step {state.global_step}: batch reward {float(logs['reward']):.3f}")

    cfg = GRPOConfig(
        output_dir=os.path.join(out, "trl"), use_cpu=True, bf16=False, seed=seed, data_seed=seed,
        per_device_train_batch_size=prompts_per_step * generations, num_generations=generations,
        max_completion_length=task.MAX_ANSWER_TOKENS, temperature=1.0, beta=0.0,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=steps,
        save_strategy="steps", save_steps=1, save_only_model=True, logging_steps=max(1, steps // 20),
        report_to="none", disable_tqdm=True)
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=answer_reward, args=cfg,
                          train_dataset=data, callbacks=[ExportBf16(), Log()])
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)  # its raw dicts drown the progress lines
    t0 = time.time()
    trainer.train()
    history = [{k: v for k, v in e.items() if k in ("step", "reward", "reward_std", "loss", "grad_norm")}
               for e in trainer.state.log_history if "reward" in e]
    return {"steps": steps, "seconds": time.time() - t0, "log": history}


def _verl_rank(rank: int, world: int, port: int, base: str, sources: dict, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from transformers import Qwen3ForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = Qwen3ForCausalLM.from_pretrained(base, dtype=torch.float32)
        mesh = init_device_mesh("cpu", (world,))

        def verl_placement(param):  # verl: the first dimension that divides by the shard count, else rows
            return next((Shard(i) for i, d in enumerate(param.shape) if d % world == 0), Shard(0))
        for layer in model.model.layers:  # verl wraps each decoder layer, then the root
            fully_shard(layer, mesh=mesh, shard_placement_fn=verl_placement)
        fully_shard(model, mesh=mesh, shard_placement_fn=verl_placement)
        for step, src in sorted(sources.items()):
            full = load_file(os.path.join(src, "model.safetensors"))
            if "lm_head.weight" not in full:  # tied: safetensors stores the embedding once
                full["lm_head.weight"] = full["model.embed_tokens.weight"]
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
            actor = os.path.join(out, f"global_step_{step}", "actor")
            os.makedirs(actor, exist_ok=True)
            torch.save(model.state_dict(), os.path.join(actor, f"model_world_size_{world}_rank_{rank}.pt"))
            if rank == 0:
                with open(os.path.join(actor, "fsdp_config.json"), "w") as fh:
                    json.dump({"FSDP_version": 2, "world_size": world}, fh, indent=4)
                model.config.save_pretrained(os.path.join(actor, "huggingface"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def write_verl_masters(out: str, steps: list[int], world: int = 2) -> str:
    """``out/verl/global_step_N/actor`` for each step, from TRL's fp32 ``checkpoint-N``."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sources = {s: os.path.join(out, "trl", f"checkpoint-{s}") for s in steps}
    dest = os.path.join(out, "verl")
    mp.spawn(_verl_rank, args=(world, port, os.path.join(out, "base"), sources, dest), nprocs=world, join=True)
    return dest

