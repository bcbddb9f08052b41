// resume connects N times to one address with a shared tls.ClientSessionCache and prints,
// for each connection, whether the handshake resumed and which backend answered.
//
// Standard library only, so it builds with no module download:
//
//	GO111MODULE=off go run resume.go -addr 127.0.0.1:8443 -ca ca.pem -n 8 -tls 1.2
//
// Output, one line per connection:
//
//	conn=1 resumed=false version=1.2 backend=backend-1
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	addr := flag.String("addr", "", "host:port to connect to")
	caFile := flag.String("ca", "", "PEM file of the CA to trust")
	n := flag.Int("n", 8, "connections")
	version := flag.String("tls", "1.2", "highest TLS version: 1.2 or 1.3")
	serverName := flag.String("servername", "localhost", "SNI and name to verify")
	path := flag.String("path", "/info", "path to GET on each connection")
	flag.Parse()

	pem, err := os.ReadFile(*caFile)
	if err != nil {
		fail("reading the CA file: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		fail("no certificate in %s", *caFile)
	}
	maxVersion := uint16(tls.VersionTLS12)
	if *version == "1.3" {
		maxVersion = tls.VersionTLS13
	} else if *version != "1.2" {
		fail("-tls must be 1.2 or 1.3")
	}
	config := &tls.Config{
		RootCAs:            roots,
		ServerName:         *serverName,
		MinVersion:         tls.VersionTLS12,
		MaxVersion:         maxVersion,
		ClientSessionCache: tls.NewLRUClientSessionCache(16),
	}
	for i := 1; i <= *n; i++ {
		resumed, got, backend, err := once(*addr, *path, config)
		if err != nil {
			fail("conn=%d: %v", i, err)
		}
		fmt.Printf("conn=%d resumed=%t version=%s backend=%s\n", i, resumed, got, backend)
	}
}

// once makes one connection, sends one request and reads the whole answer, so that a TLS 1.3
// ticket sent after the handshake reaches the session cache before the next connection.
func once(addr, path string, config *tls.Config) (bool, string, string, error) {
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	conn, err := tls.DialWithDialer(dialer, "tcp", addr, config)
	if err != nil {
		return false, "", "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET " + path + " HTTP/1.1\r\nHost: " + config.ServerName + "\r\nConnection: close\r\n\r\n"
	if _, err := conn.Write([]byte(req)); err != nil {
		return false, "", "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return false, "", "", err
	}
	_, _ = bufio.NewReader(resp.Body).WriteTo(discard{})
	resp.Body.Close()
	state := conn.ConnectionState()
	got := "1.2"
	if state.Version == tls.VersionTLS13 {
		got = "1.3"
	}
	return state.DidResume, got, resp.Header.Get("X-Backend"), nil
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "resume: "+format+"\n", args...)
	os.Exit(1)
}
