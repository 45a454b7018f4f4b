"""Direct preference optimisation and its family (DPO, IPO, conservative DPO, KTO, ORPO, SimPO; docs/DPO.md):
``core.py`` the pure loss math, ``layout.py`` rows and batches, ``kto.py`` KTO's unpaired rows and KL estimate,
``trainer.py`` the ``dpo`` stage (``run``) on the shared training engine."""
