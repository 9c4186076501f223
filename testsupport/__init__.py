"""Test doubles and helpers shared by the tests (tests/) and the benchmarks (bench/)."""
