"""Direct preference optimisation (DPO, IPO, conservative DPO): ``core.py`` the pure loss math,
``trainer.py`` the ``dpo`` stage (``run``) on the shared training engine."""
