"""Has the world changed since the champion was trained? (drift, performance decay, storm control)

* ``windows``  - ChampionInfo, reference / current windows, sampling
* ``features`` - the per-event feature frame drift is measured on
* ``drift``    - ``detect_drift(...) -> DriftOutcome`` (Evidently report + decision)
* ``storm``    - cooldown, minimum new data, one pending retrain; suppression log
* ``commands`` - ``recloop monitor``
"""
