"""The LUMID shard builder, split by concern; `data_tools.build_shards` is its command line.

- `plan`: options, discovery of input files, their grouping into units (files / DICOM series), parts.
- `series`: a DICOM series read slice by slice into contiguous sub-volumes (bad slices left out).
- `burned_in`: the burned-in text policy (images whose pixels may carry identifiers: left out, OCR-cleaned
  or kept), applied to every image before anything is written or drawn.
- `worker`: one unit -> samples (runs in worker processes), and the crash-tolerant process pool.
- `report`: the manifest, per-shard and total statistics, contact sheets.
- `build`: a build (or one part of it), resumable after a kill.
- `merge`: the parts of a build merged into one folder the loader reads like any other.
- `on_dask`: the parts run as the tasks of a Dask cluster, then merged (a command line of its own).
"""
