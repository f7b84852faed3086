"""Entry point: ``python -m codi_jax.main --config=configs/sr.py --workdir=runs/sr``.

Overrides: ``--config.train.lr=1e-5``; unknown keys are errors. Every checkpoint carries its
config, so a workdir alone is enough to go on: ``python -m codi_jax.main --workdir=runs/sr``
resumes, ``--mode=eval`` evaluates the newest checkpoint, ``--mode=export`` writes its evaluation
EMA to ``runs/sr/export``. A resume whose config changes what the checkpoint is (the model, the
objective, the data; ``train.RESUME_KEYS``) is refused with the differing keys.
"""

from __future__ import annotations

import os

# TensorFlow's C++ INFO lines (oneDNN notices) print when the config file's imports load it,
# before --verbosity is read; they are never the run's news. Set the variable to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a configs/<task>.py file (':<preset>,<preset>,key=value' "
                                "picks presets). Without it, the config saved with the workdir's newest "
                                "checkpoint.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, samples and the export go.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of process 0 "
                    "(else $JAX_COORDINATOR_ADDRESS; TPU pods and SLURM are detected).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes (else $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index (else $JAX_PROCESS_ID).")
flags.DEFINE_enum("mode", None, ["train", "eval", "export"], "Overrides the config's mode: train "
                  "(resumes), eval (the newest checkpoint), export (its evaluation EMA to <workdir>/export).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from codi_jax import console, distributed

    if not FLAGS["verbosity"].present:  # --verbosity=0 (INFO) shows every library's lines again
        console.quiet()

    # Before anything touches a JAX backend: the distributed runtime must come first.
    distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    import jax

    from codi_jax import train

    cfg = FLAGS.config or train.stored_config(FLAGS.workdir)
    if cfg is None:
        raise app.UsageError(f"--config is needed: {FLAGS.workdir} has no checkpoint with a saved config")
    if FLAGS.mode:
        cfg.mode = FLAGS.mode
    logging.info("config:\n%s", cfg)
    console.say(f"devices: {jax.device_count()} ({jax.devices()[0].device_kind}), processes: "
                f"{jax.process_count()}; workdir {FLAGS.workdir}")
    if cfg.mode not in ("train", "eval", "export"):
        raise ValueError(f"mode: unknown value {cfg.mode!r}; known: ['train', 'eval', 'export']")
    if cfg.mode == "export" and cfg.objective == "autoencoder":
        raise ValueError("mode=export: an autoencoder run exports its VAE when it ends (rerun mode=train)")
    try:
        if cfg.mode == "eval":
            train.evaluate_checkpoint(cfg, FLAGS.workdir)
        elif cfg.mode == "export":
            console.say(f"exported {train.export_checkpoint(cfg, FLAGS.workdir)}")
        elif cfg.objective == "autoencoder":
            from codi_jax import autoencoder

            autoencoder.train_and_evaluate(cfg, FLAGS.workdir)
        else:
            train.train_and_evaluate(cfg, FLAGS.workdir)
    except train.Preempted as stop:
        # A clean stop (exit status 0): the scheduler restarts the same command, which resumes.
        logging.warning("%s", stop)


if __name__ == "__main__":
    app.run(main)
