"""The pieces a training run is assembled from, one concern per module (torchtitan's layout).

* ``engine``: DeepSpeed JSON config (ZeRO stage, offload, bf16), optimizer, LR schedule, ``IRMLoss``;
* ``checkpoint``: DeepSpeed checkpoint tags (save, load, retention), the out_dir resume decision;
* ``preemption``: Slurm/submitit timeout and preemption signal, deferred to a step boundary;
* ``tracking``: ``metrics.jsonl`` and TensorBoard event files;
* ``recording``: what goes into the HDF5 stream (profiles, probe generations, base reference).

``irm_hpc.train`` wires them into the training loop.
"""
