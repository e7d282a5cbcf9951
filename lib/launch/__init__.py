"""Where a test matrix's cells run: this machine (adamwprune.run.matrix runs them as child
processes) or a Slurm cluster (slurm.py submits them as one job array through submitit;
task.py is what each array task runs on its node)."""
