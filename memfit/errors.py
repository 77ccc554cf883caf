"""Errors a user can fix by changing their input: CLIs print these as one message, servers as a 4xx."""
from __future__ import annotations

from memfit.memory.budget import MemoryBudgetExceeded

# ValueError covers ModelFormatError, InvalidSamplingParams, RequestError and bad sizes;
# FileNotFoundError covers missing model directories and data sets.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, MemoryBudgetExceeded)
