"""The HF-aware engine under the trainers: compile capture, the final-hidden-state hook, sharded LM heads,
activation offloading, memory management, atomic checkpoints and exact resume, non-finite step handling, and the
``accelerate`` launcher. It builds on ``fusedrl.ops`` and never imports the trainers or the command line."""
