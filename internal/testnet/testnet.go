// Package testnet holds what tests of several packages need of the
// network: a loopback TCP connection, both ends. Tests only import it.
package testnet

import (
	"net"
	"testing"
)

// TCPPair returns both ends of a new TCP connection on 127.0.0.1 (port
// 0): the accepted end and the dialled one, closed at the test's end.
func TCPPair(t testing.TB) (server *net.TCPConn, client net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	client, err = net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := l.Accept()
	if err != nil {
		client.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); s.Close() })
	return s.(*net.TCPConn), client
}
