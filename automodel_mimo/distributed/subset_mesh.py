"""Flattened dims of a module grid that spans only some ranks, made sliceable on torch 2.11.

nemo-automodel builds a non-colocated grid's mesh from explicit ranks and registers its flattened dims
(dp = dp_replicate x dp_shard, dp_shard_cp, dp_cp) as standalone 1-D meshes, each with the process group
this rank belongs to (mesh_utils._register_flattened_axes_for_rank_subset: every rank creates every group,
in the same order). torch 2.13 slices those by name; torch 2.11 refuses (`mesh["dp"]`: "only allows
slicing out a contiguous flattened dim"), because their layouts are not relative to the grid's root mesh.
On 2.11 each such dim is rebuilt the way torch's own `_flatten` builds it (the source dims' layout in the
root mesh, coalesced), keeping nemo's process group: no new groups, so nothing collective happens here.
Seen on 2 x H200 (torch 2.11.0+cu130) with mimo.layout.<module>.offset; CPU CI runs torch 2.13, where the
slice already works and nothing is changed.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

# nemo's flattened dims of an FSDP2 mesh and the dims each flattens (mesh_utils._create_fsdp2_device_mesh)
FLATTENED = {"dp": ("dp_replicate", "dp_shard"), "dp_shard_cp": ("dp_shard", "cp"),
             "dp_cp": ("dp_replicate", "dp_shard", "cp")}


def make_flattened_dims_sliceable(mesh: DeviceMesh) -> list[str]:
    """On a member rank of `mesh`: make `mesh[name]` work for every flattened dim; returns the repaired names."""
    repaired = []
    for name, source in FLATTENED.items():
        if name not in mesh._flatten_mapping or _sliceable(mesh, name):
            continue
        layout = mesh[source]._layout.coalesce()  # torch 2.11's _create_flatten_mesh, without a new group
        if len(layout) > 1:
            layout = layout.nest()
        flat = DeviceMesh(mesh.device_type, _layout=layout, _rank_map=mesh._rank_map, mesh_dim_names=(name,),
                          _root_mesh=mesh, _init_backend=False)
        flat._dim_group_names = mesh._flatten_mapping[name]._dim_group_names
        mesh._flatten_mapping[name] = flat
        repaired.append(name)
    return repaired


def _sliceable(mesh: DeviceMesh, name: str) -> bool:
    try:
        mesh[name]
    except NotImplementedError:
        return False
    return True
