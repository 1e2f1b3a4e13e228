"""Offline preference trainers on paired or unpaired data: DPO, ORPO, CPO (SimPO, AlphaPO) and KTO, their configs,
and the tokenization and collation they share (``data``)."""
