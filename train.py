"""Train SIMLA: `python train.py` on a laptop CPU, `torchrun --nproc_per_node=8 train.py ...` on GPUs.

With no arguments it builds the embedded synthetic world (data.py), trains the tiny preset for a few
minutes, evaluates retrieval and grounding (eval.py), and writes checkpoints, a JSONL log and heat maps
to runs/default. Everything a run needs to continue exactly is in its checkpoints (--resume latest).

Distributed: one process per device under torchrun (NCCL on CUDA, gloo on CPU), plain single process
otherwise. The global batch is batch_size x world x grad_accum.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
import eval as E
from losses import alpha_at
from model import PRESETS, SIMLA, ModelConfig, load_vit_weights, resize_pos_embed
from tokenizer import get_tokenizer


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    data: str = opt("", "training data: comma-separated JSON/JSONL/CSV/TSV files or tar shard patterns "
                        "(empty: the synthetic world, generated into --synth-dir on first use)")
    eval_data: str = opt("", "retrieval test JSON (empty: the synthetic world's test.json)")
    ground_data: str = opt("", "grounding test JSON (empty: the synthetic world's grounding_test.json)")
    synth_dir: str = opt("data/synth", "where the synthetic world lives")
    preset: str = opt("tiny", "model preset: tiny | small | base")
    task: str = opt("pretrain", "pretrain (the --losses set) | retrieval | grounding (ITC + ITM fine-tuning)")
    losses: str = opt("itc,itm,mlm,mim,psl", "enabled objectives: itc (CLIP-like), itc,itm,mlm (ALBEF-like)...")
    steps: int = opt(360, "optimizer steps")
    batch_size: int = opt(64, "per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(5e-4, "peak learning rate (the paper: 1e-4 for base)")
    min_lr: float = opt(5e-5, "cosine floor (the paper: 1e-5)")
    wd: float = opt(0.02, "AdamW weight decay on weight matrices")
    warmup: int = opt(50, "linear warm-up steps")
    alpha: float = opt(0.4, "momentum distillation weight after its ramp")
    alpha_ramp: int = opt(0, "steps over which alpha ramps from 0 (0: one epoch, as the paper)")
    img_size: int = opt(0, "training resolution (0: the preset's)")
    init: str = opt("", "start from this SIMLA checkpoint's weights (fine-tuning)")
    init_vit: str = opt("", "initialise the image encoder from timm/DeiT weights (.pt/.pth state dict)")
    tokenizer: str = opt("bpe", "bpe (trained on the training captions, cached in the run) | gpt2 | DIR")
    vocab_size: int = opt(4096, "BPE vocabulary size, the 4 special tokens included")
    out: str = opt("runs/default", "run directory: checkpoints, log.jsonl, tokenizer, heat maps")
    resume: str = opt("", "latest | PATH: continue a run exactly (weights, optimizer, data position, RNG)")
    seed: int = opt(0, "global seed")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    precision: str = opt("fp32", "fp32 | bf16 (autocast)")
    compile: bool = opt(False, "torch.compile the model (static shapes)")
    workers: int = opt(2, "data loader workers per process")
    log_every: int = opt(25, "steps between log lines")
    eval_every: int = opt(0, "steps between retrieval evaluations (0: only at the end)")
    eval_k: int = opt(16, "ITM re-rank depth in train-time evaluation, 0 = ITC only (eval.py --k 128/256 for paper numbers)")
    save_every: int = opt(500, "steps between checkpoints")
    keep: int = opt(3, "checkpoints kept")
    max_nonfinite: int = opt(10, "consecutive non-finite losses that stop the run")
    ddp_timeout_min: int = opt(30, "collective timeout in minutes")


# Fields that must match when resuming: changing them silently would not be "continuing" the run.
RESUME_MUST_MATCH = ("preset", "task", "losses", "batch_size", "grad_accum", "lr", "min_lr", "wd", "warmup",
                     "alpha", "alpha_ramp", "img_size", "seed", "tokenizer", "vocab_size", "data")


def build_parser():
    """CLI flags generated from the dataclass fields, one argparse group per concern."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = [("train", TrainConfig, ()), ("model", ModelConfig, ("img_size", "vocab_size")),
              ("data", D.DataConfig, ("img_size", "patch_size", "max_len", "workers"))]
    for title, cls, skip in groups:
        g = p.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            if title != "train":  # model/data fields default to "whatever the preset says"
                kind = type(f.default)
                g.add_argument(flag, dest=f"{title}.{f.name}", default=None, help=f"(default: preset)",
                               **({"type": _parse_bool} if kind is bool else
                                  {"type": float, "nargs": 2} if kind is tuple else {"type": kind}))
            elif isinstance(f.default, bool):
                g.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction,
                               help=f.metadata.get("help"))
            else:
                g.add_argument(flag, default=f.default, type=type(f.default), help=f.metadata.get("help"))
    return p


def _parse_bool(s):  # "--flag False" must mean False (the official code's type=bool made it True)
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def parse_args(argv=None):
    ns = vars(build_parser().parse_args(argv))
    tc = TrainConfig(**{k: v for k, v in ns.items() if "." not in k})
    over = lambda prefix: {k.split(".", 1)[1]: v for k, v in ns.items() if k.startswith(prefix) and v is not None}
    if tc.preset not in PRESETS:
        raise SystemExit(f"--preset {tc.preset!r}: choose one of {sorted(PRESETS)}")
    mc = dataclasses.replace(PRESETS[tc.preset], **over("model."))
    if tc.img_size:
        mc = dataclasses.replace(mc, img_size=tc.img_size)
    dc = dataclasses.replace(D.DataConfig(), **{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in over("data.").items()},
                             img_size=mc.img_size, patch_size=mc.patch_size, max_len=mc.max_len)
    return tc, mc, dc


# ---------------------------------------------------------------------------------------------------
# Distributed set-up: one function, and print only on rank 0.
# ---------------------------------------------------------------------------------------------------
def setup(tc):
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if tc.device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    else:
        device = f"cuda:{local}" if tc.device == "cuda" and world > 1 else tc.device
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ:  # launched by torchrun: single- or multi-node alike
        import datetime
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=tc.ddp_timeout_min))
    return rank, world, torch.device(device)


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def lr_at(step, tc):
    """Linear warm-up, then cosine from lr to min_lr (SIMLA.md, "Official optimisation")."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


# ---------------------------------------------------------------------------------------------------
# Checkpoints: atomic (temp file + fsync + rename), the last `keep` kept, loaded with weights_only=True
# so that a checkpoint file can never run code.
# ---------------------------------------------------------------------------------------------------
def checkpoints(out):
    return sorted(Path(out).glob("ckpt_*.pt"))


def save_checkpoint(out, state, keep):
    path = Path(out) / f"ckpt_{state['step']:07d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush(), os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old file set or the new one, never half a file
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"could not write checkpoint {path}: {e}. Earlier checkpoints are intact; "
                         f"free disk space or pass another --out, then --resume latest.") from e
    for old in checkpoints(out)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"checkpoint {path} does not exist: check the path, or use --resume latest")
    except Exception as e:
        raise SystemExit(f"checkpoint {path} is not a readable nanoSIMLA checkpoint ({type(e).__name__}: "
                         f"{e}). If it was cut short, resume from an earlier one in the same folder.") from e


def load_weights(model, sd, what):
    """Load a SIMLA state dict, interpolating position embeddings to this model's resolution."""
    own = model.state_dict()
    for k in [k for k in sd if k.endswith("image_encoder.pos_embed") and k in own and sd[k].shape != own[k].shape]:
        sd[k] = resize_pos_embed(sd[k], int(math.isqrt(own[k].shape[1] - 1)))
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad:
        raise SystemExit(f"{what}: shapes differ from this model for {bad[:5]}...: was it trained with another "
                         f"--preset or tokenizer?")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    return missing, unexpected


def check_resume_config(ckpt, tc, mc, path):
    old_t, old_m = ckpt["config"]["train"], ckpt["config"]["model"]
    conflicts = [f"--{k.replace('_', '-')}: checkpoint {old_t.get(k)!r}, now {getattr(tc, k)!r}"
                 for k in RESUME_MUST_MATCH if k in old_t and old_t[k] != getattr(tc, k)]
    # vocab_size comes from the tokenizer, built later (its flags are compared above).
    conflicts += [f"model.{k}: checkpoint {v!r}, now {getattr(mc, k)!r}" for k, v in old_m.items()
                  if k != "vocab_size" and getattr(mc, k, v) != v]
    if conflicts:
        raise SystemExit(f"cannot resume from {path}: its configuration conflicts with these flags:\n  "
                         + "\n  ".join(conflicts) + "\nUse the checkpoint's values, or a new --out to start afresh.")


def captions_of(paths, dc):
    """Every training caption, to train the BPE vocabulary on (annotation files and tar shards)."""
    for path in paths:
        if ".tar" in path:
            for shard in D.expand_braces(path):
                for _, files in D.iter_tar(shard):
                    if "txt" in files:
                        yield files["txt"].decode("utf-8", "replace")
                    elif "json" in files:
                        cap = json.loads(files["json"]).get(dc.caption_key, "")
                        yield from ([cap] if isinstance(cap, str) else cap)
        else:
            for _, caps in D.read_annotations(path, dc):
                yield from caps


def git_hash():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------
def main(argv=None):
    tc, mc, dc = parse_args(argv)
    rank, world, device = setup(tc)
    out = Path(tc.out)
    if tc.task != "pretrain":  # fine-tuning for retrieval / grounding uses ITC + ITM only (SIMLA.md)
        tc.losses = "itc,itm"
    terms = tuple(t for t in tc.losses.split(",") if t)
    if unknown := set(terms) - {"itc", "itm", "mlm", "mim", "psl"}:
        raise SystemExit(f"--losses: unknown terms {sorted(unknown)}; choose from itc,itm,mlm,mim,psl")

    # --- data: the synthetic world when no --data is given ----------------------------------------
    if not tc.data:
        synth = Path(tc.synth_dir)
        if rank == 0 and not (synth / "grounding_test.json").exists():
            print0(f"building the synthetic world in {synth} (once) ...")
            D.synth(synth, img_size=mc.img_size, seed=0)
        if world > 1:
            dist.barrier()
        tc.data = str(synth / "train.json")
        tc.eval_data = tc.eval_data or str(synth / "test.json")
        tc.ground_data = tc.ground_data or str(synth / "grounding_test.json")
    paths = [p for p in tc.data.split(",") if p]

    # --- resume: find the checkpoint first, it decides the tokenizer and the configuration -------------
    if not tc.resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        tc.resume = "latest"  # an elastic restart continues from the newest checkpoint
    ckpt = None
    if tc.resume:
        found = checkpoints(out) if tc.resume == "latest" else [Path(tc.resume)]
        if found:
            ckpt = load_checkpoint(found[-1])
            if not isinstance(ckpt, dict) or not {"model", "optimizer", "step", "config"} <= ckpt.keys():
                raise SystemExit(f"--resume: {found[-1]} is not a nanoSIMLA training checkpoint (weights only? "
                                 f"use --init for fine-tuning from weights)")
            check_resume_config(ckpt, tc, mc, found[-1])
            print0(f"resuming from {found[-1]} at step {ckpt['step']}")
        elif tc.resume != "latest":
            raise SystemExit(f"--resume {tc.resume}: no such checkpoint")

    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write_test").write_text("ok"), (out / ".write_test").unlink()
        except OSError as e:
            raise SystemExit(f"--out {out}: cannot write there ({e}); pass a writable directory")
        tok = get_tokenizer(tc.tokenizer, out / "tokenizer", texts=captions_of(paths, dc), vocab_size=tc.vocab_size)
    if world > 1:
        dist.barrier()
    if rank != 0:
        tok = get_tokenizer(tc.tokenizer, out / "tokenizer")
    mc = dataclasses.replace(mc, vocab_size=tok.vocab_size)

    # --- model, optimizer ------------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    model = SIMLA(mc).to(device)
    if tc.init_vit:
        missing, unexpected = load_vit_weights(model.image_encoder, load_checkpoint(tc.init_vit))
        model.momentum.image_encoder.load_state_dict(model.image_encoder.state_dict())
        print0(f"image encoder from {tc.init_vit}: missing {missing}, unexpected {unexpected[:8]}")
    if tc.init:
        missing, _ = load_weights(model, load_checkpoint(tc.init)["model"], tc.init)
        print0(f"weights from {tc.init}" + (f" (missing: {missing[:6]})" if missing else ""))
    model.set_trainable(terms)
    raw = model  # checkpoints carry clean keys: no "module." or "_orig_mod." prefixes
    optimizer = raw.configure_optimizers(tc.lr, tc.wd, device_type=device.type)
    step, epoch, offset, nonfinite_total = 0, 0, 0, 0
    if ckpt is not None:
        load_weights(raw, ckpt["model"], "checkpoint")
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, offset, nonfinite_total = ckpt["step"], ckpt["epoch"], ckpt["offset"], ckpt["nonfinite"]
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    if world > 1:
        # broadcast_buffers=False: the queues are updated identically on every rank from gathered features.
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None, broadcast_buffers=False)
    if tc.compile:
        model = torch.compile(model)

    loader = D.build_loader(paths, tok, dc, tc.batch_size, rank=rank, world=world, seed=tc.seed,
                            workers=tc.workers, pin_memory=device.type == "cuda")
    try:
        steps_per_epoch = len(loader)
    except TypeError:  # tar shards stream: no length known in advance
        steps_per_epoch = None
    if steps_per_epoch is not None and steps_per_epoch < tc.grad_accum:
        raise SystemExit(f"{tc.data}: too few samples for one step of {tc.batch_size} x {world} x {tc.grad_accum}")
    # alpha ramps over the first epoch (the paper); a stream has no epoch length: --alpha-ramp or 1000 steps.
    ramp = tc.alpha_ramp or (steps_per_epoch // tc.grad_accum if steps_per_epoch else 1000)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if tc.precision == "bf16" else nullcontext()

    def batches():
        """Endless batches from the saved (epoch, offset) position on; keeps them up to date."""
        nonlocal epoch, offset
        while True:
            loader.set_epoch(epoch, skip=offset)
            got = 0
            for b in loader:
                offset, got = offset + 1, got + 1
                yield {k: v.to(device, non_blocking=True) for k, v in b.items()}
            if got == 0 and offset == 0:
                raise SystemExit(f"{tc.data}: an epoch gave no batch of {tc.batch_size}: too few samples per rank")
            epoch, offset = epoch + 1, 0
    data_iter = batches()

    config = {"train": dataclasses.asdict(tc), "model": dataclasses.asdict(mc), "data": dataclasses.asdict(dc)}

    def state():
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {})}
        return {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                "offset": offset, "nonfinite": nonfinite_total, "rng": rng, "config": config}

    # Preemption: SIGTERM / SIGINT only raise a flag; the loop saves and exits between steps.
    stop = {"signal": None}
    handlers = {s: signal.signal(s, lambda sig, _: stop.update(signal=sig)) for s in (signal.SIGTERM, signal.SIGINT)}

    log = open(out / "log.jsonl", "a") if rank == 0 else None
    if log:
        log.write(json.dumps({"config": config, "git": git_hash(), "command": sys.argv, "world": world,
                              "start_step": step}) + "\n")
        print0(f"{sum(p.numel() for p in raw.parameters() if p.requires_grad) / 1e6:.2f}M trained parameters, "
               f"{steps_per_epoch} batches/epoch, global batch {tc.batch_size * world * tc.grad_accum}, "
               f"losses {','.join(terms)}, device {device}")
    bar = tqdm(total=tc.steps, initial=step, disable=rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True)
    model.train()
    consecutive_bad, t0, sums, n_sum = 0, time.perf_counter(), {}, 0
    while step < tc.steps:
        lr, alpha = lr_at(step, tc), alpha_at(step, ramp, tc.alpha)
        for g in optimizer.param_groups:
            g["lr"] = lr
        bad = False
        for micro in range(tc.grad_accum):
            batch = next(data_iter)
            # The model's randomness (ITM hard negatives) is seeded by the step, not carried over: the
            # DataLoader and evaluation also draw from the global RNG, at points a resumed run does not repeat.
            torch.manual_seed(D.sample_seed(tc.seed, rank, step, micro))
            sync = nullcontext() if world == 1 or micro == tc.grad_accum - 1 else model.no_sync()
            with sync:
                with amp:
                    losses = model(batch, alpha, terms)
                # Non-finite check agreed by all ranks, so that no rank runs a backward the others skip.
                flags = torch.tensor([float(not torch.isfinite(losses["loss"])), float(stop["signal"] is not None)],
                                     device=device)  # NCCL reduces CUDA tensors only
                if world > 1:
                    dist.all_reduce(flags)
                if flags[0] > 0:
                    bad = True
                    break
                (losses["loss"] / tc.grad_accum).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item() / tc.grad_accum
        if bad:  # skip the step: no update of weights or momentum model, counted
            optimizer.zero_grad(set_to_none=True)
            consecutive_bad, nonfinite_total = consecutive_bad + 1, nonfinite_total + 1
            print0(f"step {step}: non-finite loss, step skipped ({consecutive_bad} in a row)")
            if consecutive_bad >= tc.max_nonfinite:
                raise SystemExit(f"{consecutive_bad} non-finite losses in a row at step {step}: lower --lr, use "
                                 f"--precision fp32, or check the data; last good checkpoint in {out}")
            step += 1  # the schedule moves on; the data position already did
            continue
        consecutive_bad = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        raw.momentum_update()
        step, n_sum = step + 1, n_sum + 1
        bar.update(1)

        if step % tc.log_every == 0 or step == tc.steps:
            dt = (time.perf_counter() - t0) / n_sum
            rec = {"step": step, **{k: round(v / n_sum, 4) for k, v in sums.items()}, "lr": lr, "alpha": round(alpha, 4),
                   "temp": round(raw.temp.item(), 4), "step_time": round(dt, 4),
                   "samples_per_s": round(tc.batch_size * world * tc.grad_accum / dt, 1), "epoch": epoch}
            if log:
                log.write(json.dumps(rec) + "\n"), log.flush()
                bar.write(" ".join(f"{k} {v}" for k, v in rec.items())) if not bar.disable else print0(
                    " ".join(f"{k} {v}" for k, v in rec.items()))
            t0, sums, n_sum = time.perf_counter(), {}, 0
        stopping = bool(flags[1] > 0)
        if rank == 0 and (step % tc.save_every == 0 or step == tc.steps or stopping):
            save_checkpoint(out, state(), tc.keep)
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps and tc.eval_data:
            metrics = evaluate(raw, tok, tc, mc, device, out, final=False)
            if log:
                log.write(json.dumps({"step": step, "eval": metrics}) + "\n"), log.flush()
            model.train()
        if stopping:
            print0(f"signal {stop['signal']}: checkpoint saved at step {step}, exiting; --resume latest continues")
            break
    bar.close()
    for s, h in handlers.items():  # the loop is over: Ctrl-C interrupts the evaluation again
        signal.signal(s, h)
    if world > 1:
        dist.barrier()

    if step >= tc.steps and (tc.eval_data or tc.ground_data):
        metrics = evaluate(raw, tok, tc, mc, device, out, final=True)
        if log:
            log.write(json.dumps({"step": step, "eval": metrics}) + "\n")
        print0(E.format_table(metrics))
        print0(json.dumps(metrics))
    if log:
        log.close()
    if world > 1:
        dist.destroy_process_group()


def evaluate(raw, tok, tc, mc, device, out, final):
    """Retrieval (and at the end grounding) with eval.py's functions, on every rank."""
    raw.eval()
    vis = str(out / "vis") if final else None
    metrics = {}
    if tc.eval_data:
        metrics.update(E.evaluate_retrieval(raw, tok, tc.eval_data, mc.img_size, mc.max_len, device,
                                            k=max(1, tc.eval_k), itc_only=tc.eval_k == 0, vis_dir=vis))
    if final and tc.ground_data:
        metrics.update(E.evaluate_grounding(raw, tok, tc.ground_data, mc.img_size, mc.max_len, device, vis_dir=vis))
    return metrics


if __name__ == "__main__":
    main()
