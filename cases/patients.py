"""Which cases belong to one patient, so that a split never puts two scans of a patient on two sides.

BraTS 2023+ names cases `BraTS-<cohort>-<patient>-<scan>` (cohort GLI, MEN, MET, PED, SSA, ...):
BraTS-GLI-00012-000 and BraTS-GLI-00012-001 are two scans of patient BraTS-GLI-00012. Names
without a patient part (BraTS 2018-21, the project's own files) are each their own patient.
"""
import re

# cohort letters, then the patient number, then the scan number; nothing before or after
BRATS_2023_NAME = re.compile(r"^(BraTS-[A-Za-z]+-\d+)-\d+$")


def patient_id(case_id):
    """The patient of a case: `BraTS-GLI-00012` for `BraTS-GLI-00012-001`, else the case id."""
    match = BRATS_2023_NAME.match(case_id)
    return match.group(1) if match else case_id


def group_by_patient(case_ids):
    """{patient id: [case ids]} in the order the cases come."""
    groups = {}
    for case_id in case_ids:
        groups.setdefault(patient_id(case_id), []).append(case_id)
    return groups
