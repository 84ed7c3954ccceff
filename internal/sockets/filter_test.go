package sockets

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSynFilterDropsOnlyBareSYNs runs the filter program on datagrams: on
// a UDP socket the filter sees the UDP header first, so payload byte 5 is
// where a TCP segment's flags byte would be. Only SYN without ACK (with
// any other flag, as ECN's SYN|ECE|CWR) is dropped.
func TestSynFilterDropsOnlyBareSYNs(t *testing.T) {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if err := control(t, pc.(syscall.Conn), RefuseNewConnections); err != nil {
		t.Fatal(err)
	}
	out, err := net.Dial("udp4", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	flags := map[byte]bool{ // flags byte -> dropped
		0x02: true, 0x03: true, 0xc2: true, 0x0a: true, // SYN, SYN|FIN, SYN|ECE|CWR, SYN|PSH
		0x12: false, 0x10: false, 0x11: false, 0x18: false, 0x04: false, 0x14: false, 0x00: false,
	}
	for f := range flags {
		if _, err := out.Write([]byte{0, 0, 0, 0, 0, f}); err != nil {
			t.Fatal(err)
		}
	}
	// An end marker with ACK set: every datagram before it has been
	// filtered once it arrives.
	if _, err := out.Write([]byte{0, 0, 0, 0, 0, 0x10, 'E'}); err != nil {
		t.Fatal(err)
	}
	got := map[byte]bool{}
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	for buf := make([]byte, 16); ; {
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("reading the datagrams the filter kept: %v (kept so far: %v)", err, got)
		}
		if n == 7 {
			break
		}
		got[buf[5]] = true
	}
	for f, dropped := range flags {
		if got[f] == dropped {
			t.Errorf("flags %#02x: kept %v, want kept %v", f, got[f], !dropped)
		}
	}
}

// TestRefuseNewConnections, on IPv4 and IPv6: once the filter is on, a new
// SYN goes unanswered, while the connections queued before, a handshake
// that completes after (held in SYN_RECV by TCP_DEFER_ACCEPT until its
// client sends data, so that its child socket is created, copying the
// listener's filter, after the attach) and the data of all of them flow
// both ways. AcceptNewConnections takes the filter off again.
func TestRefuseNewConnections(t *testing.T) {
	for _, tc := range []struct {
		name   string
		family int
		sa     unix.Sockaddr
	}{
		{"ipv4", unix.AF_INET, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}},
		{"ipv6", unix.AF_INET6, &unix.SockaddrInet6{Addr: [16]byte{15: 1}}},
	} {
		t.Run(tc.name, func(t *testing.T) { testRefuse(t, tc.family, tc.sa) })
	}
}

func testRefuse(t *testing.T, family int, sa unix.Sockaddr) {
	fd, addr := rawListener(t, family, sa)
	const queued = 3
	var clients []net.Conn
	for i := range queued {
		c := dial(t, addr)
		clients = append(clients, c)
		fmt.Fprintf(c, "queued %d\n", i)
	}
	waitQueueLen(t, fd, queued)
	deferred := dial(t, addr) // established for its client, SYN_RECV for the listener
	clients = append(clients, deferred)
	if n, err := QueueLen(fd); err != nil || n != queued {
		t.Fatalf("QueueLen with a handshake held in SYN_RECV = %d, %v; want %d", n, err, queued)
	}
	if n, err := HandshakesPending(fd); err != nil || n != 1 {
		t.Fatalf("HandshakesPending with one held in SYN_RECV = %d, %v; want 1", n, err)
	}

	if err := RefuseNewConnections(fd); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", addr, 500*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("a new connection was accepted with the filter on")
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("a new connection with the filter on: %v, want a timeout (its SYN dropped)", err)
	}
	fmt.Fprintf(deferred, "deferred\n")

	ln := fileListener(t, fd)
	for range len(clients) {
		ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
		sc, err := ln.Accept()
		if err != nil {
			t.Fatalf("accepting the connections queued or completing with the filter on: %v", err)
		}
		defer sc.Close()
		go echo(sc)
	}
	for i, c := range clients {
		requireEcho(t, c, fmt.Sprintf("client %d", i))
	}
	if n, err := QueueLen(fd); err != nil || n != 0 {
		t.Fatalf("QueueLen once all are accepted = %d, %v; want 0", n, err)
	}
	if n, err := HandshakesPending(fd); err != nil || n != 0 {
		t.Fatalf("HandshakesPending once all are accepted = %d, %v; want 0", n, err)
	}

	if had, err := AcceptNewConnections(fd); err != nil || !had {
		t.Fatalf("AcceptNewConnections = %v, %v; want true, nil", had, err)
	}
	if had, err := AcceptNewConnections(fd); err != nil || had {
		t.Fatalf("AcceptNewConnections a second time = %v, %v; want false, nil", had, err)
	}
	c := dial(t, addr)
	fmt.Fprintf(c, "after\n") // TCP_DEFER_ACCEPT: queued once data comes
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	sc, err := ln.Accept()
	if err != nil {
		t.Fatalf("accepting once the filter is off: %v", err)
	}
	defer sc.Close()
	go echo(sc)
	requireEcho(t, c, "after the detach")
}

// rawListener listens on sa's loopback address, port 0, with
// TCP_DEFER_ACCEPT, and returns the fd and the address.
func rawListener(t *testing.T, family int, sa unix.Sockaddr) (int, string) {
	t.Helper()
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30); err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, sa); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 128); err != nil {
		t.Fatal(err)
	}
	got, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	switch a := got.(type) {
	case *unix.SockaddrInet4:
		return fd, net.JoinHostPort(net.IP(a.Addr[:]).String(), fmt.Sprint(a.Port))
	case *unix.SockaddrInet6:
		return fd, net.JoinHostPort(net.IP(a.Addr[:]).String(), fmt.Sprint(a.Port))
	}
	t.Fatalf("getsockname: %T", got)
	return -1, ""
}

// fileListener accepts from a duplicate of fd (the same socket, so the
// same filter and queue).
func fileListener(t *testing.T, fd int) net.Listener {
	t.Helper()
	nfd, err := unix.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(nfd), "listener")
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// echo answers each line with "ok " and the line, until EOF.
func echo(c net.Conn) {
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if _, err := c.Write([]byte("ok " + line)); err != nil {
			return
		}
	}
}

// requireEcho reads the answer to the line c sent, then sends another and
// reads its answer: data flows both ways on c's connection.
func requireEcho(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	for i := range 2 {
		if i == 1 {
			if _, err := c.Write([]byte("again\n")); err != nil {
				t.Fatalf("%s: writing: %v", what, err)
			}
		}
		line, err := r.ReadString('\n')
		if err != nil || len(line) < 3 || line[:3] != "ok " {
			t.Fatalf("%s: answer %d: %q, %v", what, i+1, line, err)
		}
	}
}

func waitQueueLen(t *testing.T, fd, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := QueueLen(fd)
		if err != nil {
			t.Fatal(err)
		}
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("QueueLen = %d after 5s, want %d", n, want)
		}
		time.Sleep(time.Millisecond) // polling interval, not synchronization
	}
}

func control(t *testing.T, c syscall.Conn, f func(int) error) error {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		t.Fatal(err)
	}
	return ferr
}

// TestUnixQueueLenAndUnlink: QueueLen counts the connections waiting on a
// Unix stream listener; Unlink makes a new connect() fail with ENOENT
// while those queued are still accepted, and Close then leaves a file
// bound at the path since alone.
func TestUnixQueueLenAndUnlink(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	spec, err := ParseSpec("unix://" + path)
	if err != nil {
		t.Fatal(err)
	}
	s, err := Bind(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n, err := QueueLen(s.FD); err != nil || n != 0 {
		t.Fatalf("QueueLen of a fresh Unix listener = %d, %v; want 0", n, err)
	}
	for range 2 {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	if n, err := QueueLen(s.FD); err != nil || n != 2 {
		t.Fatalf("QueueLen with 2 connections queued = %d, %v; want 2", n, err)
	}
	if had, err := s.Unlink(); err != nil || !had {
		t.Fatalf("Unlink = %v, %v; want true, nil", had, err)
	}
	if _, err := net.Dial("unix", path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("connect after Unlink: %v, want ENOENT", err)
	}
	for range 2 {
		nfd, _, err := unix.Accept4(s.FD, unix.SOCK_CLOEXEC)
		if err != nil {
			t.Fatalf("accepting a connection queued before Unlink: %v", err)
		}
		unix.Close(nfd)
	}
	if n, err := QueueLen(s.FD); err != nil || n != 0 {
		t.Fatalf("QueueLen once accepted = %d, %v; want 0", n, err)
	}
	// Someone binds the path again: Close must not remove their file.
	other, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	s.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("the socket bound at %s after Unlink is gone after Close: %v", path, err)
	}
}

func TestQueueLenErrors(t *testing.T) {
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := control(t, c.(syscall.Conn), func(fd int) error { _, err := QueueLen(fd); return err }); err == nil {
		t.Fatal("QueueLen of a UDP socket: no error")
	}
	if _, err := QueueLen(-1); err == nil {
		t.Fatal("QueueLen(-1): no error")
	}
}
