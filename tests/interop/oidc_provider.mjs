// panva/oidc-provider as a client-credentials authorization server for the
// interop tests: JWT access tokens for one resource, every client auth method.
//   node oidc_provider.mjs PORT CLIENTS_JSON [dpop-nonce]
// With "dpop-nonce", DPoP proofs at the token endpoint must carry a server
// nonce (RFC 9449 §8). DPoP itself is on (oidc-provider's default); clients
// with dpop_bound_access_tokens get JWT access tokens with cnf.jkt.
import * as crypto from 'node:crypto';
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const clients = JSON.parse(process.argv[3]);
const dpopNonce = process.argv[4] === 'dpop-nonce';
const resource = 'https://api.partner.example';
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients,
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt', 'none'],
  scopes: ['orders.read'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    dPoP: {
      enabled: true,
      nonceSecret: crypto.randomBytes(32),
      requireNonce: () => dpopNonce,
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'orders.read',
        audience: resource,
        accessTokenFormat: 'jwt',
        accessTokenTTL: 600,
      }),
    },
  },
});
provider.listen(port, '127.0.0.1', () => console.log(`listening ${issuer}`));
