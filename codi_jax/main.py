"""Entry point: ``python -m codi_jax.main --config=configs/sr.py --workdir=runs/sr``.

Overrides: ``--config.train.lr=1e-5``; unknown keys are errors. ``--config.mode=eval`` evaluates
the latest checkpoint of the workdir instead of training.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a configs/<task>.py file (':<preset>' picks a preset).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, samples and the export go.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of process 0 "
                    "(else $JAX_COORDINATOR_ADDRESS; TPU pods and SLURM are detected).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes (else $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index (else $JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from codi_jax import distributed

    # Before anything touches a JAX backend: the distributed runtime must come first.
    distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    import jax

    from codi_jax import train

    cfg = FLAGS.config
    logging.info("config:\n%s", cfg)
    logging.info("devices: %d (%s), processes: %d", jax.device_count(), jax.devices()[0].platform,
                 jax.process_count())
    if cfg.mode == "train" and cfg.objective == "autoencoder":
        from codi_jax import autoencoder

        autoencoder.train_and_evaluate(cfg, FLAGS.workdir)
    elif cfg.mode == "train":
        train.train_and_evaluate(cfg, FLAGS.workdir)
    elif cfg.mode == "eval":
        train.evaluate_checkpoint(cfg, FLAGS.workdir)
    else:
        raise ValueError(f"mode: unknown value {cfg.mode!r}; known: ['train', 'eval']")


if __name__ == "__main__":
    app.run(main)
