"""``UserRecipe.describe()`` tells recipes with different hyper-parameters apart (store reuse)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest

from ggda.errors import GGDAError
from ggda.models.recipe import UserRecipe


def factory(seed, width=8):
    raise AssertionError("never built here")


def train(model, data, seed, lr=0.1, epochs=None, on_epoch=None):
    raise AssertionError("never trained here")


@dataclass(frozen=True)
class FineTune:
    lr: float = 1e-3
    epochs: int = 2

    def __call__(self, model, data, seed, epochs=None, on_epoch=None):
        raise AssertionError("never trained here")


class Scaled:
    def __init__(self, scale):
        self.scale = np.full(3, scale)

    def __call__(self, seed):
        raise AssertionError("never built here")


def _user(recipe: UserRecipe) -> str:
    return recipe.describe()["user"]


def test_partials_with_different_arguments_describe_differently():
    a = UserRecipe(functools.partial(factory, width=8), functools.partial(train, lr=0.1))
    b = UserRecipe(functools.partial(factory, width=16), functools.partial(train, lr=0.1))
    c = UserRecipe(functools.partial(factory, width=8), functools.partial(train, lr=0.01))
    d = UserRecipe(functools.partial(factory, 8), functools.partial(train, lr=0.1))  # positional
    same = UserRecipe(functools.partial(factory, width=8), functools.partial(train, lr=0.1))
    assert len({_user(a), _user(b), _user(c), _user(d)}) == 4
    assert _user(a) == _user(same)
    assert a.describe()["key"] == f"{__name__}.factory|{__name__}.train"


def test_callable_instances_are_described_by_their_fields():
    assert _user(UserRecipe(factory, FineTune(1e-3))) != _user(UserRecipe(factory, FineTune(1e-4)))
    assert _user(UserRecipe(factory, FineTune(1e-3))) == _user(UserRecipe(factory, FineTune(1e-3)))
    assert _user(UserRecipe(Scaled(1.0), train)) != _user(UserRecipe(Scaled(2.0), train))  # arrays by content
    assert _user(UserRecipe(factory, train)) == _user(UserRecipe(factory, train))  # plain functions


def test_undescribable_state_needs_a_key():
    class Streaming:
        def __init__(self):
            self.source = iter(range(3))

        def __call__(self, seed):
            raise AssertionError

    with pytest.raises(GGDAError, match="key="):
        UserRecipe(Streaming(), train).describe()
    assert UserRecipe(Streaming(), train, key="v1").describe()["key"] == "v1"
