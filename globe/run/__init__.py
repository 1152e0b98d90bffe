"""The run layer: whole runs as both front ends (the `globe` CLI and the Hydra entry point) start them.

    globe.run.fit        FitRun -> run_fit: communicator, OUT checks, resume store, cleanup on error, save, metrics
    globe.run.export     ExportRun -> run_export: compatibility and OUT checks, model load, compressed/dense export
    globe.run.load       ModelLoad -> load_for_eval: (model, tokenizer), compressed or patched with an artifact
    globe.run.evaluate   evaluate_model / run_eval / run_eval_tasks / run_bench on a loaded model
    globe.run.calibrate  CalibrateRun -> run_calibrate: activation statistics file
    globe.run.tokenizer  load_tokenizer, read_text: the inputs beside the model
    globe.run.config     run-level dataclass configs (model, cache, export, wandb, RunConfig)
    globe.run.resume_store  OUT/.globe_checkpoint resume files (format: globe.formats.resume)
Front ends turn their arguments into these configs and print what the runs return.
"""
