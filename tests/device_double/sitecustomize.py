"""Imported at the start of every Python process whose path holds this directory (the ranks an
SPMD test starts): ``--backend triton`` runs the device pipeline on the reference double."""

import devicedouble

devicedouble.install()
