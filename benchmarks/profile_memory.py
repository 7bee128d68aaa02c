"""How much memory ``remat.profile`` holds against the step it profiles (issue 15, item 5).

A transformers BERT-base (``BertForMaskedLM(BertConfig())``, random weights, train mode), batch 2,
sequence 128, labels in a dict batch, AdamW, on the CPU. Each case runs in its own process, so its
maximum resident memory (``ru_maxrss``) is its own:

- ``plain``: a plain loop of 2 steps (forward, loss, backward, ``AdamW.step``, ``zero_grad``);
- ``none``: ``remat.profile(model, batch, options=(), repeats=0)``;
- ``selective``: ``remat.profile(..., options=["selective:save_matmuls"], repeats=0)``;
- ``default``: ``remat.profile(model, batch)``.

Each case runs under glibc's defaults and, with ``--envs``, under ``MALLOC_TRIM_THRESHOLD_=0``
(freed blocks go back to the kernel at once) and ``MALLOC_ARENA_MAX=2``: what stays high under
the first is live memory, not the allocator's retention.

``--attribute`` adds, per profile case, an instrumented run (monkeypatched from here; nothing in
``src/remat`` is changed) that records at each phase of profiling the live tensor bytes (every
``torch.Tensor`` the garbage collector sees, each storage once), what holds them (parameters,
gradients, the batch, ``preserved_state``'s clones, the state of each optimizer profiling made,
anything else), the process's resident memory, and per tracked step the tracker's peak plus what
the tracker cannot see (tensors alive before it started that no op of the step reads).

    .venv/bin/python benchmarks/profile_memory.py [--cases plain,none,selective,default]
        [--envs default,trim,arena2] [--attribute none,selective,default] [--out PATH]

Run it on a quiet machine, one heavy process at a time (each case runs alone).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LOG = logging.getLogger("profile_memory")
ENVS = {
    "default": {},
    "trim": {"MALLOC_TRIM_THRESHOLD_": "0"},
    "arena2": {"MALLOC_ARENA_MAX": "2"},
}
MIB = 2**20


def build_bert() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """BertForMaskedLM from BertConfig()'s defaults (random weights), train mode, batch 2 x 128."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig()
    if os.environ.get("PROFILE_MEMORY_SMALL"):  # a smoke test of this script, not the benchmark
        config = BertConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128
        )
    model = BertForMaskedLM(config).train()
    input_ids = torch.randint(0, config.vocab_size, (2, 128))
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones(2, 128, dtype=torch.long),
        "labels": input_ids.clone(),
    }
    return model, batch


def max_rss_bytes() -> int:
    """The process's maximum resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """The process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_storages() -> dict[int, tuple[int, torch.Tensor]]:
    """Every CPU tensor storage the garbage collector can reach from a Python tensor object:
    data pointer -> (bytes, one tensor on it). Tensors held only inside C++ (autograd's saved
    tensors) are not seen; between steps there are none."""
    gc.collect()
    found: dict[int, tuple[int, torch.Tensor]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            pointer = storage.data_ptr()
            if pointer and pointer not in found:
                found[pointer] = (storage.nbytes(), obj)
    return found


def _pointers(tensors: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


# ------------------------------------------------------------------------------------ cases
def run_plain(steps: int = 2) -> dict[str, Any]:
    """The step as a user runs it: AdamW, forward, loss, backward, step, zero_grad."""
    model, batch = build_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    started = time.perf_counter()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        del loss
    elapsed = time.perf_counter() - started
    live = sum(n for n, _ in live_storages().values())
    return {"wall_s": elapsed, "live_tensor_bytes_after": live}


def profile_kwargs(case: str) -> dict[str, Any]:
    return {
        "none": {"options": (), "repeats": 0},
        "selective": {"options": ["selective:save_matmuls"], "repeats": 0},
        "default": {},
    }[case]


def _after_profile(model: torch.nn.Module) -> dict[str, Any]:
    live = live_storages()
    return {"live_tensor_bytes_after": sum(n for n, _ in live.values())}


def run_profile_with_peak(case: str, check_unchanged: bool = False) -> dict[str, Any]:
    import remat

    model, batch = build_bert()
    sums = [p.detach().double().sum().item() for p in model.parameters()] if check_unchanged else []
    started = time.perf_counter()
    prof = remat.profile(model, batch, **profile_kwargs(case))
    elapsed = time.perf_counter() - started
    if check_unchanged:
        after = [p.detach().double().sum().item() for p in model.parameters()]
        if after != sums:
            raise AssertionError("profiling changed the model's parameters")
    out = {
        "wall_s": elapsed,
        "unplanned_peak_bytes": prof.peak_bytes,
        "full_peak_bytes": prof.full_peak_bytes,
        "static_bytes": prof.static_bytes,
    }
    del prof
    out.update(_after_profile(model))
    return out


# ------------------------------------------------------------------------------ attribution
class Attribution:
    """Monkeypatches remat's profiler to record, phase by phase, what holds tensor memory."""

    def __init__(self, model: torch.nn.Module, batch: Any) -> None:
        self.model = model
        self.batch = batch
        self.optimizers: list[weakref.ref[Any]] = []
        self.trackers: list[Any] = []
        self.clones: list[weakref.ref[Any]] = []
        self.phases: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self._undo: list[Callable[[], None]] = []

    def patch(self) -> None:
        from remat.profiling import profiler

        def swap(module: Any, name: str, make: Callable[[Any], Any]) -> None:
            original = getattr(module, name)
            setattr(module, name, make(original))
            self._undo.append(lambda: setattr(module, name, original))

        def make_optimizer(original: Any) -> Any:
            def wrapped(name: Any, model: Any) -> Any:
                opt = original(name, model)
                if opt is not None:
                    self.optimizers.append(weakref.ref(opt))
                return opt

            return wrapped

        def track_memory(original: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                tracker = original(*args, **kwargs)
                self.trackers.append(weakref.ref(tracker))
                return tracker

            return wrapped

        def preserved_state(original: Any) -> Any:
            attribution = self

            class Wrapped:
                def __init__(self, model: Any) -> None:
                    self.cm = original(model)

                def __enter__(self) -> Any:
                    value = self.cm.__enter__()
                    saved = self.cm.gen.gi_frame.f_locals.get("saved", [])
                    attribution.clones = [weakref.ref(t) for t in saved]
                    attribution.phase("preserved_state entered")
                    return value

                def __exit__(self, *exc: Any) -> Any:
                    return self.cm.__exit__(*exc)

            return Wrapped

        def tracked_step(original: Any) -> Any:
            def wrapped(model: Any, *args: Any, **kwargs: Any) -> Any:
                for param in model.parameters():
                    param.grad = None  # as the step itself does first
                before = self.live_bytes()
                opts_before = len(self.optimizers)
                trackers_before = len(self.trackers)
                result = original(model, *args, **kwargs)
                new_opt = [r() for r in self.optimizers[opts_before:]]
                opt_bytes = sum(_state_bytes(o) for o in new_opt if o is not None)
                tracker = next(
                    (r() for r in self.trackers[trackers_before:] if r() is not None), None
                )
                static = tracker.static_bytes if tracker is not None else 0
                unseen = max(before + opt_bytes - static, 0)
                self.steps.append(
                    {
                        "step": len(self.steps) + 1,
                        "live_before_bytes": before,
                        "optimizer_state_bytes": opt_bytes,
                        "tracker_static_bytes": static,
                        "tracker_peak_bytes": result[0],
                        "untracked_bytes": unseen,
                        "process_tensor_peak_bytes": result[0] + unseen,
                    }
                )
                del tracker, new_opt
                self.phase(f"after tracked step {len(self.steps)}")
                return result

            return wrapped

        def phase_after(label: str) -> Callable[[Any], Any]:
            def make(original: Any) -> Any:
                def wrapped(*args: Any, **kwargs: Any) -> Any:
                    result = original(*args, **kwargs)
                    self.phase(f"after {label}")
                    return result

                return wrapped

            return make

        swap(profiler, "make_optimizer", make_optimizer)
        swap(profiler, "track_memory", track_memory)
        swap(profiler, "preserved_state", preserved_state)
        swap(profiler, "_tracked_step", tracked_step)
        swap(profiler, "time_unit_ops", phase_after("time_unit_ops"))
        swap(profiler, "kept_by_policy", phase_after("kept_by_policy"))
        swap(profiler, "_time_steps", phase_after("_time_steps"))
        swap(profiler, "_forward_flops", phase_after("_forward_flops"))

    def unpatch(self) -> None:
        for undo in reversed(self._undo):
            undo()

    def live_bytes(self) -> int:
        return sum(n for n, _ in live_storages().values())

    def phase(self, label: str) -> None:
        """Live tensor bytes now, by holder, with the RSS now and the maximum so far."""
        live = live_storages()
        params = _pointers(self.model.parameters())
        buffers = _pointers(self.model.buffers())
        grads = _pointers(p.grad for p in self.model.parameters())
        inputs = _pointers(self.batch.values())
        clones = _pointers(r() for r in self.clones)
        opt_sets = []
        for ref in self.optimizers:
            opt = ref()
            tensors = [v for s in opt.state.values() for v in s.values()] if opt is not None else []
            opt_sets.append(_pointers(tensors))
        alive_trackers = sum(1 for r in self.trackers if r() is not None)
        holders: dict[str, int] = {}
        others: list[tuple[int, torch.Tensor]] = []
        for pointer, (nbytes, tensor) in live.items():
            if pointer in params:
                key = "parameters"
            elif pointer in buffers:
                key = "buffers"
            elif pointer in grads:
                key = "gradients"
            elif pointer in inputs:
                key = "batch"
            elif pointer in clones:
                key = "preserved_state clones"
            else:
                index = next((i for i, s in enumerate(opt_sets) if pointer in s), None)
                if index is not None:
                    key = f"optimizer #{index + 1} state"
                else:
                    key = "other"
                    others.append((nbytes, tensor))
            holders[key] = holders.get(key, 0) + nbytes
        others.sort(key=lambda x: -x[0])
        top_other = [
            {"bytes": n, "shape": list(t.shape), "dtype": str(t.dtype), "held_by": _holders(t)}
            for n, t in others[:5]
        ]
        del others, live
        record = {
            "phase": label,
            "live_tensor_bytes": sum(holders.values()),
            "by_holder": holders,
            "optimizers_made": len(self.optimizers),
            "optimizers_alive": sum(1 for r in self.optimizers if r() is not None),
            "trackers_alive": alive_trackers,
            "rss_bytes": rss_bytes(),
            "max_rss_bytes": max_rss_bytes(),
            "largest_other": top_other,
        }
        LOG.info(
            "%-32s live %7.0f MiB, rss %6.0f MiB, max rss %6.0f MiB, optimizers alive %d/%d",
            label,
            record["live_tensor_bytes"] / MIB,
            record["rss_bytes"] / MIB,
            record["max_rss_bytes"] / MIB,
            record["optimizers_alive"],
            record["optimizers_made"],
        )
        self.phases.append(record)


def _state_bytes(opt: Any) -> int:
    return sum(
        v.untyped_storage().nbytes()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


def _holders(tensor: torch.Tensor, depth: int = 3) -> list[str]:
    """Type names of what refers to ``tensor``, a few levels up (cheap: a handful of tensors)."""
    chain = []
    current: list[Any] = [tensor]
    for _ in range(depth):
        found = []
        for obj in current:
            for ref in gc.get_referrers(obj):
                if ref is current or type(ref).__name__ == "frame":
                    continue
                found.append(ref)
        if not found:
            break
        chain.append(sorted({type(r).__qualname__ for r in found})[:6])
        current = found[:4]
    return [",".join(names) for names in chain]


def run_attribution(case: str) -> dict[str, Any]:
    import remat

    model, batch = build_bert()
    attribution = Attribution(model, batch)
    attribution.patch()
    attribution.phase("model built")
    try:
        prof = remat.profile(model, batch, **profile_kwargs(case))
    finally:
        attribution.unpatch()
    peak = prof.peak_bytes
    del prof
    attribution.phase("after profile returned")
    process_peak = max(s["process_tensor_peak_bytes"] for s in attribution.steps)
    return {
        "unplanned_peak_bytes": peak,
        "profiling_tensor_peak_bytes": process_peak,
        "profiling_tensor_peak_over_unplanned": process_peak / peak,
        "max_live_between_phases_bytes": max(p["live_tensor_bytes"] for p in attribution.phases),
        "steps": attribution.steps,
        "phases": attribution.phases,
    }


def run_cycles(case: str) -> dict[str, Any]:
    """After each tracked step (and at the end), what only the cyclic garbage collector would
    free: tensor bytes in unreachable cycles and the types of the objects in them. Nothing else
    is instrumented, so until each probe the process runs as the plain profile does."""
    import remat
    from remat.profiling import profiler

    model, batch = build_bert()
    probes: list[dict[str, Any]] = []

    def probe(label: str) -> None:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            garbage = list(gc.garbage)
            gc.garbage.clear()
        finally:
            gc.set_debug(0)
        storages: dict[int, int] = {}
        kinds: dict[str, int] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for obj in garbage:
                name = type(obj).__qualname__
                kinds[name] = kinds.get(name, 0) + 1
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        del garbage
        gc.collect()
        top = dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:12])
        record = {
            "phase": label,
            "cyclic_tensor_bytes": sum(storages.values()),
            "cyclic_objects": sum(kinds.values()),
            "object_types": top,
            "rss_bytes": rss_bytes(),
            "max_rss_bytes": max_rss_bytes(),
        }
        LOG.info(
            "%-24s cyclic garbage: %7.0f MiB of tensors in %d objects; max rss %.0f MiB",
            label,
            record["cyclic_tensor_bytes"] / MIB,
            record["cyclic_objects"],
            record["max_rss_bytes"] / MIB,
        )
        probes.append(record)

    original = profiler._tracked_step

    def tracked_step(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        probe(f"after tracked step {len(probes) + 1}")
        return result

    profiler._tracked_step = tracked_step
    try:
        remat.profile(model, batch, **profile_kwargs(case))
    finally:
        profiler._tracked_step = original
    probe("after profile returned")
    return {"probes": probes}


def apply_proposed_fixes() -> None:
    """The two largest fixes this benchmark proposes, applied by monkeypatching in this process
    only (``src/remat`` is not edited), to measure what they would save:

    1. the tracker lets go of its roots (model, optimizer, batch) and detaches its storage
       finalizers when its ``with`` block exits (today ``weakref.finalize(storage,
       self._release, ...)`` keeps every tracker, its optimizer's state with it, alive for as long
       as any storage it saw, the parameters included: for the life of the process);
    2. profiling's own optimizer runs with ``lr=0`` (AdamW's decoupled decay is ``lr * wd``: a
       no-op too), so the parameters are never changed and ``preserved_state`` need not clone
       them; it still clones the buffers (a forward may update them) and restores gradients.
    """
    from contextlib import contextmanager
    from types import SimpleNamespace

    from remat.apply.apply import kv_cache_off, warn_eval_mode
    from remat.profiling import profiler, tracker

    exit_ = tracker.MemoryTracker.__exit__

    def _track(self: Any, storage: Any, info: Any) -> None:
        key = id(storage)
        self._live[key] = info
        self._all.append(info)
        self.__dict__.setdefault("_finalizers", []).append(
            weakref.finalize(storage, self._release, key, info)
        )

    def __exit__(self: Any, *exc_info: Any) -> None:
        exit_(self, *exc_info)
        for finalizer in self.__dict__.pop("_finalizers", []):
            finalizer.detach()
        self._roots = []

    tracker.MemoryTracker._track = _track
    tracker.MemoryTracker.__exit__ = __exit__
    make = profiler.make_optimizer

    def make_optimizer(name: Any, model: Any) -> Any:
        opt = make(name, model)
        for group in getattr(opt, "param_groups", []):
            group["lr"] = 0.0
        return opt

    @contextmanager
    def preserved_state(model: Any) -> Any:
        warn_eval_mode(model)
        buffers = list(model.buffers())
        saved = [b.detach().clone() for b in buffers]
        grads = [p.grad for p in model.parameters()]
        held = sum(c.untyped_storage().nbytes() for c in saved)
        held += sum(g.untyped_storage().nbytes() for g in grads if g is not None)
        try:
            with kv_cache_off(model):
                yield SimpleNamespace(held_bytes=held)  # as step.Preserved, where it exists
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved, strict=True):
                    buffer.copy_(value)
            for param, grad in zip(model.parameters(), grads, strict=True):
                param.grad = grad

    profiler.make_optimizer = make_optimizer
    profiler.preserved_state = preserved_state


def run_fixed(case: str) -> dict[str, Any]:
    """A profile case with :func:`apply_proposed_fixes`; checks the parameters are unchanged."""
    apply_proposed_fixes()
    result = run_profile_with_peak(case, check_unchanged=True)
    result["fixes"] = "tracker drops roots and finalizers on exit; lr=0, no parameter clones"
    return result


# ----------------------------------------------------------------------------------- driver
def child(case: str, attribute: bool) -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    if case.startswith("fixed:"):
        result = run_fixed(case.split(":", 1)[1])
    elif case.startswith("cycles:"):
        result = run_cycles(case.split(":", 1)[1])
    elif attribute:
        result = run_attribution(case)
    elif case == "plain":
        result = run_plain()
    else:
        result = run_profile_with_peak(case)
    result["max_rss_bytes"] = max_rss_bytes()
    print("RESULT " + json.dumps(result))
    return 0


def spawn(case: str, env_name: str, attribute: bool = False) -> dict[str, Any]:
    env = dict(os.environ, **ENVS[env_name])
    command = [sys.executable, __file__, "--child", case] + (
        ["--attribute-child"] if attribute else []
    )
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        LOG.error("%s/%s failed (%d):\n%s", case, env_name, done.returncode, done.stderr[-3000:])
        return {"case": case, "env": env_name, "error": done.stderr[-3000:]}
    if attribute or case.startswith("cycles:"):
        sys.stderr.write("\n".join(line for line in done.stderr.splitlines() if "Warn" not in line))
    result = json.loads(lines[-1][len("RESULT ") :])
    result.update(case=case, env=env_name, process_s=elapsed)
    LOG.info(
        "%-10s %-8s%s max rss %7.0f MiB (%.0f s)",
        case,
        env_name,
        " (attribution)" if attribute else "",
        result["max_rss_bytes"] / MIB,
        elapsed,
    )
    return result


def table(rows: list[dict[str, Any]]) -> str:
    plain = {
        r["env"]: r["max_rss_bytes"] for r in rows if r["case"] == "plain" and "error" not in r
    }
    lines = [
        f"{'case':<15} {'env':<8} {'max RSS MiB':>11} {'x plain':>8} {'unplanned peak MiB':>19}"
        f" {'live after MiB':>15} {'wall s':>7}",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<15} {r['env']:<8} failed")
            continue
        ratio = r["max_rss_bytes"] / plain[r["env"]] if r["env"] in plain else float("nan")
        peak = r.get("unplanned_peak_bytes")
        lines.append(
            f"{r['case']:<15} {r['env']:<8} {r['max_rss_bytes'] / MIB:>11.0f} {ratio:>8.2f}"
            f" {(peak or 0) / MIB:>19.0f} {r.get('live_tensor_bytes_after', 0) / MIB:>15.0f}"
            f" {r.get('wall_s', 0):>7.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="plain,none,selective,default")
    parser.add_argument("--envs", default="default,trim")
    parser.add_argument(
        "--other-env-cases",
        default="plain,none,selective",
        help="cases run under the envs after the first (the default profile is the slowest)",
    )
    parser.add_argument(
        "--attribute", default="", help="profile cases to also run instrumented (comma list)"
    )
    parser.add_argument(
        "--cycles", default="", help="profile cases to probe for cyclic garbage (comma list)"
    )
    parser.add_argument(
        "--out",
        default=f"benchmarks/results/profile_memory_{datetime.date.today().isoformat()}.json",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--attribute-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.child:
        return child(args.child, args.attribute_child)
    attributions = [
        spawn(case, "default", attribute=True) for case in args.attribute.split(",") if case
    ]
    attributions += [spawn(f"cycles:{case}", "default") for case in args.cycles.split(",") if case]
    envs = args.envs.split(",")
    rows = [spawn(case, envs[0]) for case in args.cases.split(",") if case]
    for env in envs[1:]:
        rows += [
            spawn(case, env)
            for case in args.cases.split(",")
            if case and case in args.other_env_cases.split(",")
        ]
    text = table(rows)
    print(text)
    import transformers

    result = {
        "format_version": 1,
        "kind": "remat.benchmark.profile_memory",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "model": "BertForMaskedLM(BertConfig()), train, batch 2, sequence 128, AdamW, float32, cpu",
        "envs": ENVS,
        "rows": rows,
        "attribution": attributions,
        "table": text,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    LOG.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
