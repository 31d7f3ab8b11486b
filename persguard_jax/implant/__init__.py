"""PersGuard backdoor implantation (Liu et al., 2025; formulation: ../shared/papers/persguard.md) as library pieces
below the ``persguard implant`` command (``workflows/implant.py``):

- ``specs``: the command's subject specs (``world:dog_03:pattern``, ``photos/:person``), parsed and checked;
- ``config``: the ``implant`` section (every loss piece switchable; the choices documented there);
- ``data``: subjects' photos, backdoor targets y* (pattern, erasure, target) and example builders;
- ``groups``: the step's example groups, built once from the subjects (L_bb, guidance, prior, retention pairs);
- ``objective``: L = L_bb + lambda_pp L_pp + lambda_br L_br from the loss library, retention behind one switch;
- ``check``: the attacker's outcome measured (protection rate by the world's detectors or CLIP, identity,
  general prompt following);
- ``check_run``: the check itself: which attacks run from which model at which seeds, what an earlier run lends
  (``clean_reuse``), ``report.png``; the attacker's DreamBooth is handed in by the command.
"""
