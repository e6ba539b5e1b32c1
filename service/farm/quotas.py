"""Per-tenant limits on what a token may put in the queue, set by the operator in the tokens file.

A tenant is a token's name (every token of one name shares its count). Three limits, each checked when a
job or release is submitted (and when a job is retried), before anything is queued:

    max_active_jobs    jobs of the tenant queued or running at once                          -> 429
    max_release_jobs   jobs one release request may make                                     -> 403
    max_priority       the highest priority the token may ask for (the range is -100..100)   -> 403

Defaults per role (ROLE_DEFAULTS) can be changed in the tokens file's "limits" and overridden per token;
null means no limit. Admin tokens have none unless the file sets some. The count is read before the
insert, so submissions arriving in the same instant may pass a limit together by a few jobs.
"""
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from core.errors import QuantfarmError

HOW_TO_RAISE = ("ask the operator to raise it: the tokens file's \"limits\" for the role, or the token's own "
                "\"limits\" entry")


class QuotaExceeded(QuantfarmError):
    """The tenant already has as many jobs queued or running as it may (429: retry when some finish)."""


class OverLimit(QuantfarmError):
    """A request that asks for more than the token may ever have: too high a priority, too many jobs in
    one release (403)."""


class LimitsSpec(BaseModel):
    """The "limits" object of the tokens file (per role, or per token); a field left out is inherited."""
    model_config = ConfigDict(extra="forbid", strict=True)
    max_active_jobs: int | None = Field(None, ge=0, le=10 ** 6, description="jobs queued or running at once")
    max_release_jobs: int | None = Field(None, ge=1, le=10 ** 4, description="jobs one release may make")
    max_priority: int | None = Field(None, ge=-100, le=100, description="the highest priority it may ask for")


@dataclass(frozen=True)
class Limits:
    max_active_jobs: int | None = None
    max_release_jobs: int | None = None
    max_priority: int | None = None

    def over(self, spec: LimitsSpec | None) -> "Limits":
        """These limits with the fields `spec` sets (null included) replacing them."""
        if spec is None:
            return self
        return Limits(**{**self.__dict__, **{k: getattr(spec, k) for k in spec.model_fields_set}})


NONE = Limits()
# A submit token may fill a small farm's queue for a day, not for a month; the largest preset (thebloke, 10
# variants) fits in one release; priority up to 10 puts a tenant's urgent jobs ahead of the default 0 and
# of nightly batches (-10), while an admin can still go past every tenant (up to 100).
ROLE_DEFAULTS = {"read": NONE, "submit": Limits(max_active_jobs=256, max_release_jobs=16, max_priority=10),
                 "admin": NONE}


def check(store, who, *, jobs: int = 1, priority: int | None = None, release: bool = False) -> None:
    """Every limit on `who` (a Principal: name, role, limits) queueing `jobs` jobs at `priority` (None: a
    retry, whose priority was checked when it was submitted); `release`: one release request."""
    lim = who.limits
    if priority is not None and lim.max_priority is not None and priority > lim.max_priority:
        raise OverLimit(f"priority {priority} is above the highest token {who.name!r} ({who.role}) may ask for "
                        f"(max_priority {lim.max_priority}); ask for at most {lim.max_priority}, or {HOW_TO_RAISE}")
    if release and lim.max_release_jobs is not None and jobs > lim.max_release_jobs:
        raise OverLimit(f"this release makes {jobs} jobs and token {who.name!r} ({who.role}) may make at most "
                        f"{lim.max_release_jobs} in one release (max_release_jobs); split its variants over "
                        f"several releases, or {HOW_TO_RAISE}")
    if lim.max_active_jobs is not None:
        active = store.active_jobs(who.name)
        if active + jobs > lim.max_active_jobs:
            raise QuotaExceeded(f"tenant {who.name!r} has {active} jobs queued or running and may have at most "
                                f"{lim.max_active_jobs} (max_active_jobs); this request would add {jobs}. Wait for "
                                f"some to finish or cancel them, or {HOW_TO_RAISE}")
