"""The exception hierarchy. User mistakes in Mappings are verdicts, never exceptions."""

from __future__ import annotations


class SmartnatError(Exception):
    """Base of every error smartnatd raises on purpose."""


class SettingsError(SmartnatError):
    """Bad SNCTRLR_* values; carries every problem found, one sentence each, and the notices
    (typo hints, ignored settings) found on the way, which often explain the problem."""

    exit_code = 78  # EX_CONFIG: systemd's RestartPreventExitStatus stops a restart loop

    def __init__(self, problems: list[str], *, notices: list[str] | None = None) -> None:
        self.problems = list(problems)
        self.notices = list(notices or ())
        super().__init__("; ".join(self.problems))


class DataplaneError(SmartnatError):
    """A pass failed to apply; the next pass is full."""

    # Set by Dataplane.apply: True when the pass's nft transaction committed and a later step
    # (policy routing) failed, so the kernel holds the new rules without all of their routes.
    nft_committed: bool = False


class NftError(DataplaneError):
    def __init__(self, message: str, *, errno_name: str = "", saved_path: str = "") -> None:
        self.errno_name = errno_name
        self.saved_path = saved_path
        super().__init__(message + (f" (transaction saved to {saved_path})" if saved_path else ""))


class NetlinkApplyError(DataplaneError):
    pass


class KubeApiError(SmartnatError):
    def __init__(self, message: str, *, status: int = 0) -> None:
        self.status = status
        super().__init__(message)

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500
