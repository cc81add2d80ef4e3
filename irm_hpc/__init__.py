"""irm_hpc: Injectable Realignment Model (IRM) sweeps at HPC scale.

Pipeline stages (one module each): ``train`` (DeepSpeed IRM training), ``record`` (HDF5 stream),
``launch`` (submitit sweeps on Slurm), ``status`` (queue monitor), ``analysis`` (striations).
"""

__version__ = "0.1.0"
