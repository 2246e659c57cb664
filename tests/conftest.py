# The scripts live at the repository root: make them importable however pytest is started
# (python -m pytest tests, pytest tests/test_pack.py, or from inside tests/).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
