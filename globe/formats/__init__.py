"""GloBE's on-disk formats, one module each: its format version, its reader and its writer.

    globe.formats.artifact     banks.safetensors + globe_config.json (what `globe fit` writes)
    globe.formats.checkpoint   the compressed Hugging Face checkpoint: GloBE state keys, `quantization_config`
                               (format 2), and the read-only format-1 marker files
    globe.formats.resume       OUT/.globe_checkpoint/: finished families and fits in progress
    globe.formats.stats        activation statistics (`globe calibrate`)
    globe.formats.sweep        the budget-sweep JSON (`globe sweep`)

A layer of its own above globe.io: it imports only globe.core, globe.errors and globe.io helpers, and everything
that reads or writes one of these files (fit, artifact, runtime, export, eval, run) imports it. Readers accept
every version up to their own and reject newer ones with an ArtifactError naming the file.
"""
