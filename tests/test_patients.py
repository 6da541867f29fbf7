"""Patient IDs from case names: two scans of one BraTS 2023 patient form one group."""
import pytest

from cases.patients import group_by_patient, patient_id


@pytest.mark.parametrize("case_id, patient", [
    ("BraTS-GLI-00012-000", "BraTS-GLI-00012"),
    ("BraTS-GLI-00012-001", "BraTS-GLI-00012"),
    ("BraTS-MEN-00012-000", "BraTS-MEN-00012"),     # another cohort: another patient
    ("BraTS-SSA-00126-000", "BraTS-SSA-00126"),
    ("BraTS-PED-00030-000", "BraTS-PED-00030"),
    ("BraTS-MET-00002-100", "BraTS-MET-00002"),
    ("Brats18_CBICA_ABM_1", "Brats18_CBICA_ABM_1"),  # 2018-21 names carry no scan number
    ("BraTS2021_00012", "BraTS2021_00012"),
    ("BraTS-GLI-00012", "BraTS-GLI-00012"),          # no scan part: the name itself
    ("BraTS-GLI-00012-000_seg", "BraTS-GLI-00012-000_seg"),
    ("case_003", "case_003"),
])
def test_patient_id(case_id, patient):
    assert patient_id(case_id) == patient


def test_two_scans_of_one_patient_are_one_group():
    cases = ["BraTS-GLI-00012-001", "BraTS-GLI-00005-000", "BraTS-GLI-00012-000", "case_003"]
    assert group_by_patient(cases) == {"BraTS-GLI-00012": ["BraTS-GLI-00012-001", "BraTS-GLI-00012-000"],
                                       "BraTS-GLI-00005": ["BraTS-GLI-00005-000"], "case_003": ["case_003"]}
    assert group_by_patient([]) == {}
