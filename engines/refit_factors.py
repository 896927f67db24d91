"""The "refit-factors" variant of a refittable folder: each component's graph with a low-rank branch on every
module its swappable adapters target, the factors graph inputs (`lowrank_graph`), so ONNX Runtime swaps
adapters by binding the adapters' own factors, with no merged weight computed (refit="factors").

Each module's branch has the total rank of the folder's swappable adapters there (static shapes), so it is
written anew whenever that changes: by `lcmrt build --refittable`, `lcmrt adapter add`, and
`lcmrt build --engines-only` on a folder that lacks it or whose adapters outgrew it.
"""
from __future__ import annotations

from pathlib import Path

import onnx
from safetensors import safe_open

from ..folder_update import fresh_graph_name
from ..manifest import REFIT_FACTORS, Manifest, file_sha256, folder_file
from .lowrank_graph import Branch, add_lowrank_branches


def factor_ranks(folder: Path, manifest: Manifest) -> dict[str, dict[str, int]]:
    """{component: {module: total rank}} over the folder's swappable adapters (read from the packs' headers)."""
    ranks: dict[str, dict[str, int]] = {}
    refit_map = manifest.refit_map
    for adapter in manifest.adapters:
        if adapter.fused or adapter.pack is None:
            continue
        with safe_open(str(folder_file(folder, adapter.pack)), "np") as pack:
            for module in adapter.targets:
                rank = pack.get_slice(f"{module}.down").get_shape()[0]
                component = refit_map[module].component
                ranks.setdefault(component, {})[module] = ranks.get(component, {}).get(module, 0) + rank
    return ranks


def factor_graphs_current(folder: Path, manifest: Manifest) -> bool:
    """Does every component's refit-factors variant have exactly the ranks its adapters need?"""
    for component, ranks in factor_ranks(folder, manifest).items():
        variant = manifest.component(component).variants.get(REFIT_FACTORS)
        if variant is None or {m: f.rank for m, f in variant.factors.items()} != ranks:
            return False
    return True


def write_factor_graphs(folder: Path, manifest: Manifest | dict) -> None:
    """Write and record (in `manifest`, which the caller commits) each component's refit-factors graph; it
    shares the fp32 graph's data file, like the refit-inputs variant."""
    manifest = Manifest.of(manifest)
    folder = Path(folder)
    ranks = factor_ranks(folder, manifest)
    refit_map = manifest.refit_map
    for component in manifest.components:
        if REFIT_FACTORS not in manifest.component(component).variants and component not in ranks:
            continue
        graph = folder / fresh_graph_name(folder, manifest, component, REFIT_FACTORS)  # the old one stays until the commit
        manifest.drop_variant(component, REFIT_FACTORS)
        if component not in ranks:
            continue
        entry = manifest.component(component).graph_fp32
        model = onnx.load(str(folder / entry.file), load_external_data=False)
        branches = [Branch(m, refit_map[m].weight, refit_map[m].transpose, rank)
                    for m, rank in sorted(ranks[component].items())]
        names = add_lowrank_branches(model, branches)
        graph.write_bytes(model.SerializeToString())
        files = [graph.name] + [f for f in entry.sha256 if f != entry.file]  # shares the data file
        factors = {m: {"down": names[m][0], "up": names[m][1], "rank": ranks[component][m]} for m in names}
        manifest.set_variant(component, REFIT_FACTORS, {
            "file": graph.name, "sha256": {f: file_sha256(folder / f) for f in files},
            "precision": entry.precision, "factors": factors})

