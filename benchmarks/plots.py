"""PNG plots of a `compare.json` report (matplotlib, no display needed).

stages.png   warm time per generation split into text encoder, UNet steps and VAE decode, with the
             end-to-end median and its min..max range
summary.png  cold start, peak RSS and the UNet step / VAE decode as a fraction of the roofline
"""
from __future__ import annotations

from pathlib import Path


def plot_report(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["contenders"]
    labels = [f"{r['contender']}\nbatch {r['batch']}, {r['steps']} steps" for r in rows]
    y = list(range(len(rows)))
    cfg = report["config"]
    title = f"{cfg['arch']} {cfg['size']} {cfg['width']}x{cfg['height']}, guidance {cfg['guidance']}, fp32"

    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.7 * len(rows)))
    left = [0.0] * len(rows)
    for key, name, color in (("text_encoder_s", "text encoder", "#8da0cb"), ("unet_total", "UNet steps", "#fc8d62"),
                             ("vae_decode_s", "VAE decode", "#66c2a5")):
        widths = []
        for r in rows:
            if key == "unet_total":
                widths.append(r["unet_step_s"]["median"] * r["steps"] if r["unet_step_s"] else 0.0)
            else:
                widths.append(r[key]["median"] if r[key] else 0.0)
        ax.barh(y, widths, left=left, color=color, label=name)
        left = [a + b for a, b in zip(left, widths)]
    e2e = [r["e2e_s"]["median"] for r in rows]
    err = [[m - r["e2e_s"]["min"] for m, r in zip(e2e, rows)], [r["e2e_s"]["max"] - m for m, r in zip(e2e, rows)]]
    ax.errorbar(e2e, y, xerr=err, fmt="k|", capsize=4, label="end to end (median, min..max)")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per generation (warm)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    stages = Path(out) / "stages.png"
    fig.savefig(stages, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 1.2 + 0.6 * len(rows)), sharey=True)
    axes[0].barh(y, [r["cold_start_s"]["median"] if r["cold_start_s"] else 0 for r in rows], color="#e78ac3")
    axes[0].barh(y, e2e, color="#999999", height=0.35, label="warm generation")
    axes[0].set_xlabel("cold start, s (imports + load + first image)")
    axes[0].legend(fontsize=8)
    axes[1].barh(y, [(r["peak_rss_bytes"] or 0) / 1e9 for r in rows], color="#a6d854")
    axes[1].set_xlabel("peak RSS, GB")
    height = 0.38
    for offset, key, color in ((-height / 2, "unet_step", "#fc8d62"), (height / 2, "vae_decode", "#66c2a5")):
        axes[2].barh([i + offset for i in y], [r.get("roofline_fraction", {}).get(key, 0) for r in rows],
                     height=height, color=color, label=key.replace("_", " "))
    axes[2].axvline(1.0, color="k", lw=0.8)
    axes[2].set_xlabel(f"fraction of roofline ({report['machine']['gemm_peak_gflops']:.0f} GFLOP/s)")
    axes[2].legend(fontsize=8)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    summary = Path(out) / "summary.png"
    fig.savefig(summary, dpi=110)
    plt.close(fig)
    return [stages, summary]
