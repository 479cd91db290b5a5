"""channel.send/recv: the framing of multiprocessing.Connection, read in one go."""

import multiprocessing
import threading

import pytest

from ezpq_mgr import channel


@pytest.fixture
def pipe():
    a, b = multiprocessing.Pipe()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("obj", [None, 1, ("#RETURN", {"x": b"y" * 10}), b"z" * 70000,
                                 list(range(300000))])
def test_round_trip_both_ways_with_the_stdlib(pipe, obj):
    a, b = pipe
    result = []
    reader = threading.Thread(target=lambda: result.append(channel.recv(b)))
    reader.start()  # big messages need a reader while they are written
    channel.send(a, obj)
    reader.join(30)
    assert result == [obj]
    reader = threading.Thread(target=lambda: result.append(b.recv()))
    reader.start()
    channel.send(a, obj)
    reader.join(30)
    assert result[1] == obj
    reader = threading.Thread(target=lambda: result.append(channel.recv(b)))
    reader.start()
    a.send(obj)
    reader.join(30)
    assert result[2] == obj


def test_end_of_file(pipe):
    a, b = pipe
    a.close()
    with pytest.raises(EOFError):
        channel.recv(b)


def test_a_second_message_in_flight_is_an_error_not_a_loss(pipe):
    a, b = pipe
    channel.send(a, "one")
    channel.send(a, "two")
    with pytest.raises(OSError, match="second message"):
        channel.recv(b)
