"""The PNG plots of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from bench.cells import (
    LABELS,
    LIMIT_GAP_P99,
    LIMIT_TTFT_P99,
    PEERS,
    Cell,
    levels,
    value_of,
)


def plot(cells: dict[tuple[str, str, int], Cell], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "upstream": "#888888",
        "gateway": "#1f77b4",
        "litellm": "#d62728",
        "relay": "#2ca02c",
    }
    written: list[str] = []

    def series(phase: str, config: str, name: str, scale: float) -> tuple[list[int], list[float]]:
        xs: list[int] = []
        ys: list[float] = []
        for level in levels(cells, phase):
            value = value_of(cells.get((phase, config, level)), name)
            if value is not None:
                xs.append(level)
                ys.append(value * scale)
        return xs, ys

    figures: list[tuple[str, str, list[tuple[str, str, str, float]]]] = [
        (
            "added_ttft.png",
            "added time to first token, ms (paced; log scale)",
            [("added_ttft_p50", "p50", "-", 1000.0), ("added_ttft_p99", "p99", "--", 1000.0)],
        ),
        (
            "added_gap_p99.png",
            "added inter-chunk gap p99, ms (paced)",
            [("added_gap_p99", "p99", "-", 1000.0)],
        ),
        (
            "cpu_per_1k_tokens.png",
            "CPU-seconds per 1,000 relayed tokens (paced)",
            [("cpu_per_1k", "", "-", 1.0)],
        ),
        (
            "rss_per_stream.png",
            "resident memory per open stream, KB (paced)",
            [("rss_per_stream", "", "-", 1 / 1024)],
        ),
    ]
    for filename, title, metrics in figures:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        configs = ["upstream", *PEERS] if filename.startswith("cpu") else list(PEERS)
        for config in configs:
            for name, suffix, style, scale in metrics:
                xs, ys = series("paced", config, name, scale)
                if xs:
                    label = f"{LABELS[config]} {suffix}".strip()
                    ax.plot(xs, ys, style, marker="o", color=colours[config], label=label)
        if filename == "added_ttft.png":
            ax.set_yscale("symlog", linthresh=1.0)
            ax.axhline(LIMIT_TTFT_P99 * 1000, color="black", lw=0.8, ls=":", label="p99 limit")
        if filename == "added_gap_p99.png":
            ax.set_yscale("symlog", linthresh=1.0)
            ax.axhline(LIMIT_GAP_P99 * 1000, color="black", lw=0.8, ls=":", label="limit")
        ax.set_xscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)
        written.append(filename)
    return written
