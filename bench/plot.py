"""Render one study's figure; runs in ``bench/.venv-tools`` (matplotlib), reading a JSON
spec on stdin (written by ``common.plot``)."""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _bars(ax, labels, values, title, ylabel, ref=None, ref_label=None, fmt="{:,.0f}"):
    colors = ["#999999" if "original" in lbl else "#2b6cb0" for lbl in labels]
    bars = ax.bar(range(len(labels)), values, color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    for b, v in zip(bars, values):
        ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    if ref is not None:
        ax.axhline(ref, color="#c53030", linestyle="--", linewidth=1)
        ax.annotate(ref_label, (len(labels) - 0.5, ref), ha="right", va="bottom",
                    color="#c53030", fontsize=7)


def hit_path(s, fig):
    axs = fig.subplots(1, 3)
    _bars(axs[0], s["ratio_sides"], s["ratios"], "hits/s at 32 callers, × the original",
          "× original (same workload, same run)", ref=10, ref_label="target 10×",
          fmt="{:.2f}")
    _bars(axs[1], s["sides"], s["c32"], "hits/s, 32 callers (batch 32)", "requests/s")
    _bars(axs[2], s["sides"], s["seq_p50"], "sequential hit p50 (p99 = dot)", "ms",
          ref=5.0, ref_label="target 5 ms", fmt="{:.2f}")
    axs[2].plot(range(len(s["sides"])), s["seq_p99"], "o", color="black", markersize=3)


def miss_backlog(s, fig):
    ax = fig.subplots(1, 1)
    _bars(ax, s["sides"], s["walls"], "256 unique misses, 200 ms model, 32 concurrent",
          "wall seconds (median)", ref=s["ideal"] * 1.15, ref_label="target 1.15 × ideal",
          fmt="{:.2f}")
    ax.axhline(s["ideal"], color="black", linestyle=":", linewidth=1)


def scaling(s, fig):
    axs = fig.subplots(1, 3 if "miss" in next(iter(s["series"].values())) else 2)
    for workers, series in s["series"].items():
        label = f"{workers} cache worker(s)"
        line = axs[0].plot(s["clients"], series["thr"], marker="o", label=label)[0]
        if "miss" in series:
            axs[1].plot(s["clients"], series["miss"], marker="o", label=label)
            axs[2].plot(s["clients"], series["redis_hit"], marker="o", color=line.get_color(),
                        label=f"hit, {label}")
            axs[2].plot(s["clients"], series["redis_miss"], marker="s", linestyle="--",
                        color=line.get_color(), label=f"miss, {label}")
        else:
            axs[1].plot(s["clients"], series["rt"], marker="o", label=label)
    axs[0].axhline(s["original"], color="#999999", linestyle="--", label="original, 1 process")
    axs[0].set_title("cache-hit throughput (32 callers per client)", fontsize=10)
    axs[0].set_ylabel("requests/s")
    if len(axs) == 3:
        axs[1].set_title("miss throughput (sim model, 0 latency, 1 batch worker)", fontsize=10)
        axs[1].set_ylabel("requests/s")
        axs[2].set_title("redis-server CPU per request", fontsize=10)
        axs[2].set_ylabel("µs")
    else:
        axs[1].axhline(1.0, color="#c53030", linestyle="--", label="target ≤ 1")
        axs[1].set_title("Redis round trips per hit (server read events)", fontsize=10)
    for ax in axs:
        ax.set_xlabel("client processes")
        ax.set_ylim(bottom=0)
        ax.set_xticks(s["clients"])
        ax.legend(fontsize=7)


def savings(s, fig):
    axs = fig.subplots(1, 2)
    for ax, side in zip(axs, s["sides"]):
        d = s["data"][side]
        x = range(len(d["methods"]))
        ax.bar(x, d["generated"], label="generated (paid)", color="#2b6cb0")
        ax.bar(x, d["saved"], bottom=d["generated"], label="served from cache", color="#9ae6b4")
        ax.set_xticks(list(x), d["methods"], rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{side}: samples per method", fontsize=10)
        ax.legend(fontsize=7)


def multiprocess(s, fig):
    axs = fig.subplots(1, 2)
    labels = s["labels"]
    _bars(axs[0], labels, s["ratio"], "samples generated / minimum", "ratio",
          ref=1.0, ref_label="minimum", fmt="{:.2f}")
    _bars(axs[1], labels, s["violations"], "i.i.d. violations", "count")


KINDS = {"hit_path": hit_path, "miss_backlog": miss_backlog, "scaling": scaling,
         "savings": savings, "multiprocess": multiprocess}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    fig = plt.figure(figsize=spec.get("size", (13, 4.2)), layout="constrained")
    KINDS[spec["kind"]](spec, fig)
    fig.savefig(spec["output"], dpi=110)


if __name__ == "__main__":
    main()
