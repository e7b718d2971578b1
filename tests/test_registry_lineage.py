import json

from models.registry import _validation_results


def test_validation_results_found_by_batch_id(settings):
    for folder, name, batch in [(settings.processed_dir, "a.parquet", "a-1"), (settings.quarantine_dir, "b.csv", "b-2"),
                                (settings.processed_dir, "c.parquet", "c-3")]:
        (folder / f"{name}.validation.json").write_text(json.dumps({"outcome": {"batch_id": batch}}))
    (settings.processed_dir / "torn.parquet.validation.json").write_text("{not json")
    found = _validation_results(settings, ["a-1", "b-2"])
    assert [p.split("/")[-1] for p in found] == ["a.parquet.validation.json", "b.csv.validation.json"]
    assert _validation_results(settings, []) == []
