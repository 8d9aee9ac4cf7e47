"""The project's own exceptions. The CLI turns them into one-line messages and exit code 2;
the HTTP layer maps them to OpenAI-style error bodies."""


class QLMError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(QLMError):
    """A bad configuration file or value. The message names the file and field."""


class WorkloadError(QLMError):
    """A bad trace or workload file. The message names the file and the line."""
