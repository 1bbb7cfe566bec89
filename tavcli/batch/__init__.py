"""`tav batch`: many tune/invert/edit jobs from a TOML or JSON Lines file, validated before any work.

- `schema`: the job format as pydantic models built from the option declarations, and its JSON Schema;
- `jobs`: reading files into validated jobs (paths resolved, writes confined with `--root`);
- `running`: this process's share of the jobs, run or planned through the workflow.

Importing it imports no torch: parsing and validating stay fast and testable on their own.
"""

from tavcli.batch.jobs import BatchContext, Job, JobProblem, check_frames, parse_jobs, read_jobs
from tavcli.batch.running import assign, failure_record, plan_jobs, process_slot, run_jobs
from tavcli.batch.schema import job_file_schema

__all__ = [
    "BatchContext",
    "Job",
    "JobProblem",
    "assign",
    "check_frames",
    "failure_record",
    "job_file_schema",
    "parse_jobs",
    "plan_jobs",
    "process_slot",
    "read_jobs",
    "run_jobs",
]
