"""PersGuard backdoor implantation (Liu et al., 2025; formulation: ../shared/papers/persguard.md) as library pieces
below the ``persguard implant`` command (``workflows/implant.py``):

- ``specs``: the command's subject specs (``world:dog_03:pattern``, ``photos/:person``), parsed and checked;
- ``config``: the ``implant`` section (every loss piece switchable; the choices documented there);
- ``data``: subjects' photos, backdoor targets y* (pattern, erasure, target) and the step's example groups;
- ``objective``: L = L_bb + lambda_pp L_pp + lambda_br L_br from the loss library, retention behind one switch;
- ``check``: the attacker's outcome measured (protection rate by the world's detectors or CLIP, identity,
  general prompt following).
"""
