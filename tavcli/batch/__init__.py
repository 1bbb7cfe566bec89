"""`tav batch`: many tune/invert/edit jobs from a TOML or JSON Lines file, validated before any work.

- `schema`: the job format as pydantic models built from the option declarations, and its JSON Schema;
- `reading`: reading TOML and JSON Lines files (or stdin) into each job's fields;
- `jobs`: validated jobs (paths resolved, writes confined with `--root`);
- `running`: jobs run or planned through the workflow;
- `processes`: this process's share of the jobs, and the end of a batch over several processes.

Importing it imports no torch: parsing and validating stay fast and testable on their own.
"""

from tavcli.batch.jobs import BatchContext, Job, JobProblem, check_frames, parse_jobs
from tavcli.batch.processes import Slot, Tally, assign, batch_slot, finish, process_slot, settle_current_tunes
from tavcli.batch.reading import read_jobs
from tavcli.batch.running import failure_record, plan_jobs, run_jobs
from tavcli.batch.schema import job_file_schema

__all__ = [
    "BatchContext",
    "Job",
    "JobProblem",
    "Slot",
    "Tally",
    "assign",
    "batch_slot",
    "check_frames",
    "failure_record",
    "finish",
    "job_file_schema",
    "parse_jobs",
    "plan_jobs",
    "process_slot",
    "read_jobs",
    "run_jobs",
    "settle_current_tunes",
]
