"""MHA -> MLA conversion (sources, calibration, partial_rope, lowrank, convert), the shared base every
other module of mla-zoo imports (common: errors, atomic writes, hashing, text; schema: settings and
reports), and in `remote/` the files copied verbatim into every checkpoint."""
