// Command hbone is an independent HBONE peer for interop tests, built only on Go's standard
// library (crypto/tls and the HTTP/2 support bundled in net/http).
//
// HBONE: HTTP/2 over mutual TLS 1.3 (ALPN "h2"); each proxied TCP connection is one HTTP/2
// CONNECT stream whose :authority is the target host:port. The server answers 200 once it has
// connected to the target, then bytes flow as DATA frames both ways; END_STREAM is a TCP
// half-close. 400 = malformed request, 401 = denied, 503 = target unreachable.
//
// Usage:
//
//	hbone client --connect HOST:PORT --authority HOST:PORT --cert-dir DIR --expect-identity spiffe://...
//	hbone server --listen HOST:PORT --cert-dir DIR [--ready-file PATH]
//
// The client is like nc: stdin goes into the stream, the stream comes out on stdout; stdin EOF
// ends the request body (END_STREAM) and the client keeps reading until the response ends.
// It exits 0 only if the server answered 200 and both directions finished cleanly.
//
// The server logs one line per request to stderr, starting with "peer=<client SPIFFE ID>", and
// "listening=<host:port>" once it accepts connections (the same address is written to
// --ready-file, atomically).
//
// Certificates are read from DIR in Istio's file layout: cert-chain.pem (leaf first, then
// intermediates), key.pem, root-cert.pem.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

const (
	certChainFile = "cert-chain.pem"
	keyFile       = "key.pem"
	rootCertFile  = "root-cert.pem"

	connectTimeout = 10 * time.Second
	copyBufferSize = 64 << 10
)

func usage() {
	fmt.Fprintf(os.Stderr, `usage:
  hbone client --connect HOST:PORT --authority HOST:PORT --cert-dir DIR --expect-identity spiffe://TD/ns/NS/sa/SA [--header "Name: value"]...
  hbone server --listen HOST:PORT --cert-dir DIR [--ready-file PATH]
`)
	os.Exit(2)
}

func main() {
	log.SetFlags(0)
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "client":
		log.SetPrefix("hbone client: ")
		os.Exit(runClient(os.Args[2:]))
	case "server":
		log.SetPrefix("hbone server: ")
		os.Exit(runServer(os.Args[2:]))
	default:
		usage()
	}
}

// ---------------------------------------------------------------------------------------------
// certificates and identities

type credential struct {
	cert  tls.Certificate
	roots *x509.CertPool
	id    *url.URL // our own SPIFFE ID
}

func loadCredential(dir string) (*credential, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, certChainFile), filepath.Join(dir, keyFile))
	if err != nil {
		return nil, fmt.Errorf("loading %s and %s from %s: %w", certChainFile, keyFile, dir, err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("parsing leaf certificate in %s: %w", filepath.Join(dir, certChainFile), err)
	}
	cert.Leaf = leaf
	id, err := spiffeID(leaf)
	if err != nil {
		return nil, fmt.Errorf("own certificate in %s: %w", filepath.Join(dir, certChainFile), err)
	}
	rootPEM, err := os.ReadFile(filepath.Join(dir, rootCertFile))
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		return nil, fmt.Errorf("%s: no PEM certificate found", filepath.Join(dir, rootCertFile))
	}
	return &credential{cert: cert, roots: roots, id: id}, nil
}

// spiffeID returns the certificate's single URI SAN, which must be a spiffe:// URI of the form
// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
func spiffeID(cert *x509.Certificate) (*url.URL, error) {
	if len(cert.URIs) != 1 {
		return nil, fmt.Errorf("certificate has %d URI SANs, want exactly one SPIFFE ID", len(cert.URIs))
	}
	u := cert.URIs[0]
	parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	if u.Scheme != "spiffe" || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" ||
		len(parts) != 4 || parts[0] != "ns" || parts[1] == "" || parts[2] != "sa" || parts[3] == "" {
		return nil, fmt.Errorf("URI SAN %q is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>", u.String())
	}
	return u, nil
}

// verifyChain checks a peer's certificate chain (leaf first) against our roots, without any
// host name check (mesh identities are URI SANs, not DNS names), and returns the leaf.
func verifyChain(rawCerts [][]byte, roots *x509.CertPool) (*x509.Certificate, error) {
	if len(rawCerts) == 0 {
		return nil, errors.New("peer presented no certificate")
	}
	certs := make([]*x509.Certificate, len(rawCerts))
	for i, raw := range rawCerts {
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return nil, fmt.Errorf("peer certificate %d: %w", i, err)
		}
		certs[i] = c
	}
	intermediates := x509.NewCertPool()
	for _, c := range certs[1:] {
		intermediates.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: intermediates,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, fmt.Errorf("peer certificate chain does not verify against %s: %w", rootCertFile, err)
	}
	return certs[0], nil
}

// ---------------------------------------------------------------------------------------------
// client

type headerList []string

func (h *headerList) String() string     { return strings.Join(*h, ", ") }
func (h *headerList) Set(v string) error { *h = append(*h, v); return nil }

func runClient(args []string) int {
	fs := flag.NewFlagSet("hbone client", flag.ContinueOnError)
	connect := fs.String("connect", "", "HBONE server address HOST:PORT to dial")
	authority := fs.String("authority", "", "target HOST:PORT, sent as the CONNECT :authority")
	certDir := fs.String("cert-dir", "", "directory with cert-chain.pem, key.pem, root-cert.pem")
	expect := fs.String("expect-identity", "", "SPIFFE ID the server's certificate must carry")
	var headers headerList
	fs.Var(&headers, "header", `extra request header "Name: value" (repeatable), e.g. forwarded or baggage`)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *connect == "" || *authority == "" || *certDir == "" || *expect == "" || fs.NArg() != 0 {
		log.Print("--connect, --authority, --cert-dir and --expect-identity are required")
		return 2
	}
	cred, err := loadCredential(*certDir)
	if err != nil {
		log.Print(err)
		return 1
	}

	tlsConfig := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		MaxVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
		Certificates: []tls.Certificate{cred.cert},
		// The standard verification would check a host name; we verify the chain ourselves
		// against root-cert.pem and then compare the URI SAN with the expected identity.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
			leaf, err := verifyChain(rawCerts, cred.roots)
			if err != nil {
				return err
			}
			id, err := spiffeID(leaf)
			if err != nil {
				return fmt.Errorf("server certificate: %w", err)
			}
			if id.String() != *expect {
				return fmt.Errorf("server identity mismatch: got %s, expected %s", id, *expect)
			}
			return nil
		},
	}
	dialer := &tls.Dialer{NetDialer: &net.Dialer{Timeout: connectTimeout}, Config: tlsConfig}
	transport := &http.Transport{
		ForceAttemptHTTP2: true,
		// Dial TLS ourselves so that only "h2" is offered and required (the transport would
		// otherwise also offer http/1.1).
		DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := dialer.DialContext(ctx, network, addr)
			if err != nil {
				if errors.Is(err, context.DeadlineExceeded) {
					err = fmt.Errorf("no TCP + TLS connection within %s", connectTimeout)
				}
				return nil, fmt.Errorf("dial %s: %w", addr, err)
			}
			st := conn.(*tls.Conn).ConnectionState()
			if st.Version != tls.VersionTLS13 || st.NegotiatedProtocol != "h2" {
				conn.Close()
				return nil, fmt.Errorf("server negotiated TLS version %#x, ALPN %q; HBONE needs TLS 1.3 and h2",
					st.Version, st.NegotiatedProtocol)
			}
			return conn, nil
		},
	}
	defer transport.CloseIdleConnections()

	// Request body: stdin, through a pipe; closing the pipe ends the stream (END_STREAM).
	bodyReader, bodyWriter := io.Pipe()
	go func() {
		_, err := io.CopyBuffer(bodyWriter, os.Stdin, make([]byte, copyBufferSize))
		bodyWriter.CloseWithError(err) // nil error: EOF for the reader
	}()

	// WroteRequest fires once the transport has finished with the request body: after the
	// END_STREAM frame is written, or with the error that stopped it.
	wrote := make(chan error, 1)
	trace := &httptrace.ClientTrace{WroteRequest: func(info httptrace.WroteRequestInfo) {
		select {
		case wrote <- info.Err:
		default:
		}
	}}
	ctx := httptrace.WithClientTrace(context.Background(), trace)
	req, err := http.NewRequestWithContext(ctx, http.MethodConnect, "https://"+*connect, bodyReader)
	if err != nil {
		log.Print(err)
		return 1
	}
	req.Host = *authority // the :authority pseudo-header; the URL host is only where we dial
	for _, h := range headers {
		name, value, ok := strings.Cut(h, ":")
		if !ok {
			log.Printf("--header %q: want \"Name: value\"", h)
			return 2
		}
		req.Header.Add(strings.TrimSpace(name), strings.TrimSpace(value))
	}

	resp, err := transport.RoundTrip(req)
	if err != nil {
		log.Printf("CONNECT %s via %s failed: %v", *authority, *connect, err)
		return 1
	}
	defer resp.Body.Close()
	fmt.Fprintf(os.Stderr, "status=%d proto=%s\n", resp.StatusCode, resp.Proto)
	if resp.ProtoMajor != 2 {
		log.Printf("response came over %s, not HTTP/2", resp.Proto)
		return 1
	}
	if resp.StatusCode != http.StatusOK {
		log.Printf("CONNECT %s refused: %s", *authority, resp.Status)
		return 1
	}

	// Response body → stdout until the server's END_STREAM (or a reset).
	if _, err := io.CopyBuffer(os.Stdout, resp.Body, make([]byte, copyBufferSize)); err != nil {
		log.Printf("reading from the stream: %v", err)
		return 1
	}
	// The server has half-closed: pass that on (EOF for whoever reads our stdout), and keep
	// sending stdin until its EOF, like a half-closed TCP socket.
	if err := os.Stdout.Close(); err != nil {
		log.Printf("closing stdout: %v", err)
		return 1
	}
	if err := <-wrote; err != nil {
		log.Printf("writing to the stream: %v", err)
		return 1
	}
	return 0
}

// ---------------------------------------------------------------------------------------------
// server

type server struct {
	cred *credential
}

func runServer(args []string) int {
	fs := flag.NewFlagSet("hbone server", flag.ContinueOnError)
	listen := fs.String("listen", "", "address to listen on, HOST:PORT (port 0: any free port)")
	certDir := fs.String("cert-dir", "", "directory with cert-chain.pem, key.pem, root-cert.pem")
	readyFile := fs.String("ready-file", "", "write the bound HOST:PORT here once listening")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *listen == "" || *certDir == "" || fs.NArg() != 0 {
		log.Print("--listen and --cert-dir are required")
		return 2
	}
	cred, err := loadCredential(*certDir)
	if err != nil {
		log.Print(err)
		return 1
	}
	s := &server{cred: cred}

	tlsConfig := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		MaxVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
		Certificates: []tls.Certificate{cred.cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    cred.roots,
		// After the standard chain verification: the client must be a mesh workload of our trust
		// domain, and the connection must be HTTP/2 (ServeTLS also offers http/1.1).
		VerifyConnection: func(st tls.ConnectionState) error {
			if st.NegotiatedProtocol != "h2" {
				return fmt.Errorf("client negotiated ALPN %q, HBONE needs h2", st.NegotiatedProtocol)
			}
			if len(st.PeerCertificates) == 0 {
				return errors.New("client presented no certificate")
			}
			id, err := spiffeID(st.PeerCertificates[0])
			if err != nil {
				return fmt.Errorf("client certificate: %w", err)
			}
			if id.Host != cred.id.Host {
				return fmt.Errorf("client identity %s is not in trust domain %s", id, cred.id.Host)
			}
			return nil
		},
	}
	srv := &http.Server{
		Handler:           s,
		TLSConfig:         tlsConfig,
		ReadHeaderTimeout: connectTimeout,
		ErrorLog:          log.New(os.Stderr, "hbone server: ", 0),
	}

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Print(err)
		return 1
	}
	addr := ln.Addr().String()
	if *readyFile != "" {
		if err := writeFileAtomic(*readyFile, addr+"\n"); err != nil {
			log.Print(err)
			ln.Close()
			return 1
		}
	}
	fmt.Fprintf(os.Stderr, "listening=%s identity=%s\n", addr, cred.id)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		srv.Close()
	}()
	if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Print(err)
		return 1
	}
	return 0
}

func writeFileAtomic(path, content string) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".")
	if err != nil {
		return err
	}
	_, err = tmp.WriteString(content)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	peer := "unknown"
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		if id, err := spiffeID(r.TLS.PeerCertificates[0]); err == nil {
			peer = id.String()
		}
	}
	// One write per line, so concurrent requests do not interleave.
	fmt.Fprintf(os.Stderr, "peer=%s method=%s authority=%s proto=%s forwarded=%q baggage=%q\n",
		peer, r.Method, r.Host, r.Proto, r.Header.Get("Forwarded"), r.Header.Get("Baggage"))

	if r.ProtoMajor != 2 || r.Method != http.MethodConnect {
		http.Error(w, "HBONE expects an HTTP/2 CONNECT request", http.StatusBadRequest)
		return
	}
	if host, port, err := net.SplitHostPort(r.Host); err != nil || host == "" || port == "" {
		http.Error(w, fmt.Sprintf(":authority %q is not HOST:PORT", r.Host), http.StatusBadRequest)
		return
	}
	flusher, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "response writer cannot flush", http.StatusInternalServerError)
		return
	}
	target, err := net.DialTimeout("tcp", r.Host, connectTimeout)
	if err != nil {
		log.Printf("dial %s: %v", r.Host, err)
		http.Error(w, "upstream unreachable", http.StatusServiceUnavailable)
		return
	}
	defer target.Close()
	w.WriteHeader(http.StatusOK)
	flusher.Flush()

	// Client → target. The request body's EOF is the client's END_STREAM: half-close the target.
	upDone := make(chan error, 1)
	go func() {
		_, err := io.CopyBuffer(target, r.Body, make([]byte, copyBufferSize))
		if tc, ok := target.(*net.TCPConn); ok {
			if cerr := tc.CloseWrite(); err == nil {
				err = cerr
			}
		}
		upDone <- err
	}()

	// Target → client, flushing every chunk so bytes are not held back.
	buf := make([]byte, copyBufferSize)
	var downErr error
	for {
		n, rerr := target.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				downErr = werr
				break
			}
			flusher.Flush()
		}
		if rerr != nil {
			if !errors.Is(rerr, io.EOF) {
				downErr = rerr
			}
			break
		}
	}
	if downErr != nil {
		// Not a clean half-close: stop the other direction too (the stream gets reset).
		log.Printf("%s → %s: %v", r.Host, peer, downErr)
		target.Close()
		r.Body.Close()
	}
	// Returning from the handler ends the response stream (END_STREAM); if the client is still
	// sending, net/http would reset the stream, so first wait for the client's END_STREAM.
	// (net/http's server cannot end the response while the request body stays open.)
	if err := <-upDone; err != nil && downErr == nil {
		log.Printf("%s → %s: %v", peer, r.Host, err)
	}
}
