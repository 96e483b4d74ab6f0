"""Replay training steps from a checkpoint with per-stage instruments (the evidence behind docs/stability.md).

Loads `RUN_DIR/checkpoints/ckpt-<kimg>.pt`, rebuilds the run's data stream, noise and keyed randomness exactly as
`diffit_cli.training.train` does, and for every optimizer step records, per stage of the network (`enc.0`,
`dec.1`, `t_embedder`, ...):

- the gradient norm and the update-to-weight ratio ‖Δw‖/‖w‖;
- the largest pre-softmax attention logit q·kᵀ/√d + B of its TMSA layers, and the time token's share of q
  (‖x_t·W_qt + b_q‖ / ‖x_s·W_qs‖, averaged over tokens);
- the RMS of the activations after each block;

and writes them as JSON lines. `--precision fp32` replays the same steps without bf16 autocast.

    python benchmarks/diagnose_stability.py runs/repro --kimg 80 --steps 300 --out runs/diag-bf16.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import defaultdict
from pathlib import Path

import torch

from diffit_cli.build import build_diffusion, build_network, build_optimizer
from diffit_cli.checkpoint import checkpoint_name, load_checkpoint
from diffit_cli.codecs import make_codec
from diffit_cli.config import load_preset
from diffit_cli.core.attention import TMSA
from diffit_cli.core.unet import ResBlock
from diffit_cli.data import make_loader, open_source
from diffit_cli.training.recipe import batch_to_x0, keyed_seed, learning_rate


def stage_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("enc", "dec") else parts[0]


def instrument(net: torch.nn.Module, stats: dict) -> list:
    """Forward hooks that fill `stats[stage]` with logit maxima, q time-share and block output RMS."""

    def on_tmsa(name):
        def hook(m, args, out):
            x, x_t, hw = args
            with torch.no_grad():
                stats[stage_of(name)]["logit_max"].append(m.logits(x, x_t, hw).amax().item())
                C = x.shape[-1]
                q_s = torch.nn.functional.linear(x.float(), m.qkv.weight[:C].float())  # (B, N, C)
                q_t = m.qkv_temb(x_t.float())[:, :C] + m.qkv.bias[:C].float()  # (B, C)
                share = q_t.norm(dim=-1) / q_s.norm(dim=-1).mean(dim=1).clamp_min(1e-12)
                stats[stage_of(name)]["q_time_share"].append(share.mean().item())

        return hook

    def on_block(name):
        def hook(m, args, out):
            stats[stage_of(name)]["act_rms"].append(out.detach().float().pow(2).mean().sqrt().item())

        return hook

    handles = []
    for name, m in net.named_modules():
        if isinstance(m, TMSA) and m.time_mode == "tmsa":
            handles.append(m.register_forward_hook(on_tmsa(name)))
        elif isinstance(m, ResBlock):
            handles.append(m.register_forward_hook(on_block(name)))
    return handles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--kimg", type=float, required=True, help="checkpoint to start from")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: the run's")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="preset override, e.g. train.lr=5e-4")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    ckpt = load_checkpoint(args.run_dir / "checkpoints" / checkpoint_name(round(args.kimg * 1000)))
    preset_path = args.run_dir / "preset.yaml"
    preset = load_preset(preset_path, args.overrides)
    tc = preset.train
    precision = args.precision or tc.mixed_precision
    torch.manual_seed(tc.seed)
    net = build_network(preset.model)
    net.load_state_dict(ckpt["model"])
    opt = build_optimizer(net.parameters(), tc)
    opt.load_state_dict(ckpt["optimizer"])
    nimg, step = ckpt["nimg"], ckpt["step"]
    diffusion = build_diffusion(preset.diffusion, preset.model)
    codec = make_codec(preset.data, torch.device("cpu"))
    loader = make_loader(
        open_source(preset.data),
        tc.batch,
        seed=tc.seed,
        rank=0,
        world_size=1,
        num_workers=0,
        pin_memory=False,
        start_index=nimg,
    )
    batches = iter(loader)
    noise_gen = torch.Generator()
    stages = sorted({stage_of(n) for n, _ in net.named_parameters()})
    params = {s: [p for n, p in net.named_parameters() if stage_of(n) == s] for s in stages}
    autocast = (lambda: torch.autocast("cpu", torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for _ in range(args.steps):
            torch.manual_seed(keyed_seed(tc.seed, step, 0))
            noise_gen.manual_seed(keyed_seed(tc.seed, step, 1 << 20))
            for g in opt.param_groups:
                g["lr"] = learning_rate(tc, nimg)
            x0, y = batch_to_x0(next(batches), preset, codec, torch.device("cpu"))
            aug = x0.new_zeros(x0.shape[0], preset.model.augment_dim) if preset.model.augment_dim else None
            draws = diffusion.training_noise(tc.batch, tuple(x0.shape[1:]), noise_gen)
            stats: dict = defaultdict(lambda: defaultdict(list))
            handles = instrument(net, stats)
            with autocast():
                loss = diffusion.loss(net, x0, y, augment_labels=aug, **draws)
            for h in handles:
                h.remove()
            loss.mean().backward()
            before = {s: [p.detach().clone() for p in ps] for s, ps in params.items()}
            rec = {"kimg": nimg / 1000, "step": step, "loss": loss.mean().item(), "stages": {}}
            for s, ps in params.items():
                grads = [p.grad for p in ps if p.grad is not None]
                rec["stages"][s] = {"grad_norm": torch.stack([g.norm() for g in grads]).norm().item() if grads else 0.0}
            opt.step()
            opt.zero_grad(set_to_none=True)
            for s, ps in params.items():
                dw = torch.stack([(p.detach() - b).norm() for p, b in zip(ps, before[s])]).norm()
                w = torch.stack([b.norm() for b in before[s]]).norm()
                rec["stages"][s]["update_ratio"] = (dw / w.clamp_min(1e-12)).item()
                for k, v in stats.get(s, {}).items():
                    rec["stages"][s][k] = max(v) if k == "logit_max" else sum(v) / len(v)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            nimg += tc.batch
            step += 1


if __name__ == "__main__":
    main()
