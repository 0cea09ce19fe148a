"""The second half of tests/test_matrix.py's rows (the table, the cells and the expectations
live there): run from this file so that the suite's two workers share the rows."""
import pytest

from tests import test_matrix as matrix


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
  return matrix.make_contexts(tmp_path_factory, matrix.MORE_ROWS)


@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
@pytest.mark.parametrize("row", matrix.MORE_ROWS)
def test_every_command(row, contexts):
  """One row: every command works, or is refused as the table says (one line, a user error)."""
  matrix.check_row(contexts[row])
