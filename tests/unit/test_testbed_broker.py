"""Which RabbitMQ node the tests and benchmarks address."""

from testbed.infra import BrokerNode


def test_the_machines_own_node_by_default():
    node = BrokerNode.from_environment({})
    assert node.vhost_url("followups_t_1") == "amqp://guest:guest@127.0.0.1:5672/followups_t_1"
    assert node.management_root == "http://guest:guest@127.0.0.1:15672"
    assert node.cli("list_vhosts") == ["rabbitmqctl", "-q", "list_vhosts"]
    assert node.delay_backend == "levels"


def test_a_second_node_is_addressed_by_its_ports_and_name():
    node = BrokerNode.from_environment(
        {
            "TESTBED_RABBITMQ_NODE": "rabbit2@localhost",
            "TESTBED_AMQP_PORT": "5673",
            "TESTBED_MANAGEMENT_PORT": "15673",
            "TESTBED_DELAY_BACKEND": "plugin",
        }
    )
    assert node.vhost_url("a/b") == "amqp://guest:guest@127.0.0.1:5673/a%2Fb"
    assert node.management_api == "http://127.0.0.1:15673/api"
    assert node.cli("status") == ["rabbitmqctl", "-q", "-n", "rabbit2@localhost", "status"]
    assert node.delay_backend == "plugin"
