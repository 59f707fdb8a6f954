import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long variants (run with -m slow)")


@pytest.fixture
def tmp(tmp_path):
    return str(tmp_path)
