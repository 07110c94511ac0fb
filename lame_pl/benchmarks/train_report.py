"""The training-step benchmark's report: the headline ratios, why any of them is null, the printed table."""

from __future__ import annotations

from typing import Any

GOAL = 1.5  # the goal for both ratios
MEMORY_KEY = "memory_ratio_gradcache_b{big}_over_plain_b{small}"
HEADLINE_BATCHES = (256, 8)  # GradCache batch, plain batch of the headline memory ratio


def _find(results: list[dict], mode: str, size: int) -> dict | None:
    return next((r for r in results if r["mode"] == mode and r["batch"] == size), None)


def ratios(results: list[dict]) -> tuple[dict[str, Any], dict[str, str]]:
    """The headline ratios, and why any of them is null."""
    out: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    big, small = HEADLINE_BATCHES
    key = MEMORY_KEY.format(big=big, small=small)
    cache, plain = _find(results, "gradcache", big), _find(results, "plain", small)
    if cache and plain:
        out[key] = cache["peak_mib"] / plain["peak_mib"]
        out[key + "_over_start"] = cache["peak_over_start_mib"] / plain["peak_over_start_mib"]
    else:
        out[key] = out[key + "_over_start"] = None
        missing = [
            name for name, found in ((f"gradcache batch {big}", cache), (f"plain batch {small}", plain)) if not found
        ]
        reasons[key] = reasons[key + "_over_start"] = f"not run: {' and '.join(missing)}"
    # The same figures for whatever ran: the largest GradCache batch over the smallest plain batch.
    key = "memory_ratio_largest_gradcache_over_smallest_plain"
    caches = [r for r in results if r["mode"] == "gradcache"]
    plains = [r for r in results if r["mode"] == "plain"]
    if caches and plains:
        cache, plain = max(caches, key=lambda r: r["batch"]), min(plains, key=lambda r: r["batch"])
        out[key] = cache["peak_mib"] / plain["peak_mib"]
        out[key + "_over_start"] = cache["peak_over_start_mib"] / plain["peak_over_start_mib"]
        out["memory_ratio_batches"] = {"gradcache": cache["batch"], "plain": plain["batch"]}
    else:
        out[key] = out[key + "_over_start"] = out["memory_ratio_batches"] = None
        reasons[key] = reasons[key + "_over_start"] = "not run: " + (
            "no GradCache batch" if not caches else "no plain batch"
        )
    common = sorted({r["batch"] for r in caches} & {r["batch"] for r in plains})
    if common:
        size = common[-1]
        out["time_ratio_gradcache_over_plain"] = (
            _find(results, "gradcache", size)["s_per_sample"] / _find(results, "plain", size)["s_per_sample"]
        )
        out["time_ratio_batch"] = size
        out["cpu_time_ratio_gradcache_over_plain"] = (
            _find(results, "gradcache", size)["cpu_s_per_sample"] / _find(results, "plain", size)["cpu_s_per_sample"]
        )
    else:
        out["time_ratio_gradcache_over_plain"] = out["time_ratio_batch"] = None
        out["cpu_time_ratio_gradcache_over_plain"] = None
        reasons["time_ratio_gradcache_over_plain"] = reasons["cpu_time_ratio_gradcache_over_plain"] = (
            "not run: no batch size ran both plain and GradCache"
        )
    return out, reasons


def print_table(report: dict[str, Any]) -> None:
    """The human-readable summary."""
    cfg = report["config"]
    cpu = cfg["device"] == "cpu"
    print(
        f"{cfg['preset']} + decoder {cfg['decoder_preset']} on {cfg['device']} ({cfg['dtype']}), "
        f"stage 2 {cfg['recipe']}, K={cfg['K']}, "
        f"{cfg['image_size']}px images, {cfg['steps']} timed steps after 1 warm-up; "
        f"load average {report['load_average_start']} -> {report['load_average_end']}"
    )
    start, peak = ("RSS before steps", "peak RSS") if cpu else ("allocated before", "peak allocated")
    print(f"| step | batch | chunk | s/step | CPU s/step | samples/s | {start} MiB | {peak} MiB | peak - start MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        print(
            f"| {r['mode']} | {r['batch']} | {r['chunk'] or '-'} | {r['seconds'] / r['steps']:.2f} | "
            f"{r['cpu_seconds'] / r['steps']:.2f} | {r['samples_per_s']:.2f} | {r['start_mib']:.0f} | "
            f"{r['peak_mib']:.0f} | {r['peak_over_start_mib']:.0f} |"
        )
    print()
    for key, value in report["ratios"].items():
        if isinstance(value, float):
            print(f"{key}: {value:.3f}")
        elif value is None and key in report["null_reasons"]:
            print(f"{key}: null ({report['null_reasons'][key]})")
    print(
        f"(goals: memory ratio <= {GOAL}, time ratio <= {GOAL}; the extra encoder forward adds about 1/3 when "
        "the weights train, about 1/2 with adapters on frozen weights)"
    )
