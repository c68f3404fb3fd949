package redis

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

func TestRenderSettingsAndTLS(t *testing.T) {
	base := Conf{Bind: "127.0.0.1", Port: 16000, Dir: "/d/x/data", LogFile: "/l/x.log", ACLFile: "/d/x/users.acl", MemoryMB: 64}
	out := string(Render(base))
	for _, w := range []string{"maxmemory-policy noeviction", "port 16000"} {
		if !strings.Contains(out, w) {
			t.Errorf("default config lacks %q", w)
		}
	}
	for _, n := range []string{"tls-", "maxmemory-clients"} {
		if strings.Contains(out, n) {
			t.Errorf("default config has %q:\n%s", n, out)
		}
	}
	c := base
	c.MaxmemoryPolicy, c.MaxmemoryClients = "allkeys-lru", "10%"
	c.TLS = &TLS{Port: 16001, CertFile: "/d/x/tls/s.crt", KeyFile: "/d/x/tls/s.key", CAFile: "/d/x/tls/ca.crt"}
	out = string(Render(c))
	for _, w := range []string{"maxmemory-policy allkeys-lru", "maxmemory-clients 10%", "port 16000", "tls-port 16001",
		`tls-cert-file "/d/x/tls/s.crt"`, `tls-key-file "/d/x/tls/s.key"`, `tls-ca-cert-file "/d/x/tls/ca.crt"`, "tls-auth-clients no"} {
		if !strings.Contains(out, w) {
			t.Errorf("config lacks %q:\n%s", w, out)
		}
	}
	c.TLS.Required = true
	if out := string(Render(c)); !strings.Contains(out, "\nport 0\n") || !strings.Contains(out, "tls-port 16001") {
		t.Errorf("TLS required: want port 0 and the TLS port:\n%s", out)
	}
}

// testCA is a CA of a test, and certificates from it.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
	pool *x509.CertPool
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ca := &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pool: x509.NewCertPool()}
	ca.pool.AddCert(cert)
	return ca
}

// leaf writes a server certificate for 127.0.0.1 with serial n and its key
// into dir, and returns their paths.
func (ca *testCA) leaf(t *testing.T, dir string, n int64) (certFile, keyFile string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpl := &x509.Certificate{SerialNumber: big.NewInt(n), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(key)
	certFile = filepath.Join(dir, "s"+strconv.FormatInt(n, 10)+".crt")
	keyFile = filepath.Join(dir, "s"+strconv.FormatInt(n, 10)+".key")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600)
	return certFile, keyFile
}

// TLS goes on, its certificate is replaced and the plain port closes on a
// running server, all by CONFIG SET: a TLS client verifying against the
// CA connects, a connection open across a certificate change keeps
// working while new ones get the new certificate, and the Admin follows
// to the TLS port.
func TestTLSLive(t *testing.T) {
	conf, port := plainRedis(t, "")
	runRedis(t, conf)
	a := NewAdmin("127.0.0.1", port, "pw")
	defer a.Close()
	waitUp(t, a)
	ctx := context.Background()
	dir := t.TempDir()
	ca := newTestCA(t)
	caFile := filepath.Join(dir, "ca.crt")
	os.WriteFile(caFile, ca.pem, 0o600)
	certFile, keyFile := ca.leaf(t, dir, 100)
	tlsPort := testenv.FreePort(t)
	cfg := &TLS{Port: tlsPort, CertFile: certFile, KeyFile: keyFile, CAFile: caFile}
	if err := a.SetConfig(ctx, TLSSettings(cfg, port)...); err != nil {
		t.Fatal(err)
	}
	clientConf := &tls.Config{RootCAs: ca.pool, ServerName: "127.0.0.1"}
	serial := func() int64 {
		t.Helper()
		c, err := tls.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(tlsPort)), clientConf)
		if err != nil {
			t.Fatalf("TLS handshake verifying against the CA: %v", err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
	}
	if got := serial(); got != 100 {
		t.Fatalf("serial %d, want 100", got)
	}
	tc := goredis.NewClient(&goredis.Options{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(tlsPort)), Username: AdminUser, Password: "pw",
		TLSConfig: clientConf, PoolSize: 1, MaxRetries: -1, DisableIdentity: true})
	defer tc.Close()
	if err := tc.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("go-redis over TLS: %v", err)
	}
	// A stranger's CA is refused.
	other := newTestCA(t)
	if c, err := tls.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(tlsPort)), &tls.Config{RootCAs: other.pool, ServerName: "127.0.0.1"}); err == nil {
		c.Close()
		t.Fatal("a client trusting another CA accepted the server's certificate")
	}

	// Renewal: new files, new names.
	cfg.CertFile, cfg.KeyFile = ca.leaf(t, dir, 101)
	if err := a.SetConfig(ctx, TLSSettings(cfg, port)...); err != nil {
		t.Fatal(err)
	}
	if got := serial(); got != 101 {
		t.Fatalf("after the renewal a new connection gets serial %d, want 101", got)
	}
	if err := tc.Get(ctx, "k").Err(); err != nil {
		t.Fatalf("the TLS connection open across the renewal broke: %v", err)
	}

	// Required: the plain port closes, the Admin's kept connection stays;
	// new ones go over TLS.
	cfg.Required = true
	if err := a.SetConfig(ctx, TLSSettings(cfg, port)...); err != nil {
		t.Fatal(err)
	}
	a.UseTLS(tlsPort, clientConf)
	if err := a.Ping(ctx); err != nil {
		t.Fatalf("the kept connection after the plain port closed: %v", err)
	}
	if c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port))); err == nil {
		c.Close()
		t.Fatal("the plain port still takes connections with TLS required")
	}
	a.Close()
	if err := a.Ping(ctx); err != nil {
		t.Fatalf("a new connection over TLS: %v", err)
	}
	// Off again: the plain port reopens, the TLS one closes.
	if err := a.SetConfig(ctx, TLSSettings(nil, port)...); err != nil {
		t.Fatal(err)
	}
	a.UseTLS(0, nil)
	a.Close()
	if err := a.Ping(ctx); err != nil {
		t.Fatalf("plain again: %v", err)
	}
	if c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(tlsPort))); err == nil {
		c.Close()
		t.Fatal("the TLS port still takes connections with TLS off")
	}
}

// A client's CLIENT PAUSE ALL holds every command, the agent's too: Ping
// then says so with an error that is alive (Held), not a timeout that
// would read as a hang, and Responsive answers at once.
func TestPingDuringPauseIsHeld(t *testing.T) {
	conf, port := plainRedis(t, "")
	runRedis(t, conf)
	a := NewAdmin("127.0.0.1", port, "pw")
	defer a.Close()
	waitUp(t, a)
	c := a.client()
	defer c.Close()
	ctx := context.Background()
	if err := c.Do(ctx, "CLIENT", "PAUSE", "60000", "ALL").Err(); err != nil {
		t.Fatal(err)
	}
	// The pause holds CLIENT UNPAUSE too: only its end frees the
	// server, or its exit (the test's end kills it).
	t0 := time.Now()
	if err := a.Responsive(ctx); err != nil {
		t.Fatalf("Responsive of a paused server: %v", err)
	}
	if d := time.Since(t0); d > time.Second {
		t.Fatalf("Responsive took %v", d)
	}
	pctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	err := a.Ping(pctx)
	cancel()
	var h interface{ Held() bool }
	if !errors.As(err, &h) || !h.Held() || !Alive(err) {
		t.Fatalf("Ping of a paused server = %v; want a Held() error that is Alive", err)
	}
	// A server that does not answer at all is not held.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	silent := NewAdmin("127.0.0.1", l.Addr().(*net.TCPAddr).Port, "pw")
	pctx, cancel = context.WithTimeout(ctx, 300*time.Millisecond)
	err = silent.Ping(pctx)
	cancel()
	if err == nil || Alive(err) {
		t.Fatalf("Ping of a silent server = %v; want an error that is not alive", err)
	}
}
